"""The app behind a real `python -m monailabel.main start_server`, driven as Slicer and OHIF drive it."""
import json
from pathlib import Path

import nrrd
import numpy as np
import pytest
import requests
import SimpleITK as sitk

from clinlens.server import read_multipart, slicer_post


def images(server, prefix):
    ids = sorted(requests.get(server.url + "/datastore/?output=all").json()["objects"])
    return [i for i in ids if i.startswith(prefix)]


def assert_still_serving(server):
    assert requests.get(server.url + "/info/", timeout=10).status_code == 200


def phantom_server(tmp_path_factory, name: str, conf: dict | None = None, **studies):
    """A module's own real server over fresh phantom studies (`make_studies(**studies)`); yields it
    with `.studies`, `.tmp` and `.model_dir` set. Use inside a fixture: `yield from phantom_server(...)`."""
    from clinlens.data.studies import make_studies
    from clinlens.server import Server

    root = tmp_path_factory.mktemp(f"{name}_studies")
    make_studies(root, progress=False, **studies)
    work = tmp_path_factory.mktemp(f"{name}_server")
    conf = {"model_dir": work / "model", **(conf or {})}
    with Server(root, log_path=work / "server.log", conf=conf) as s:
        s.studies, s.tmp, s.model_dir = root, work, Path(conf["model_dir"])
        yield s
    print(f"server log: {work / 'server.log'}")


def test_info_has_the_schema_slicer_expects(server):
    info = requests.get(server.url + "/info/").json()
    assert "config" not in info  # Slicer refuses servers whose /info has a top-level config
    assert info["name"] == "clinlens" and isinstance(info["labels"], dict)
    assert {"nodule", "pleural effusion"} <= set(info["labels"])
    for key in ("models", "trainers", "strategies", "scoring", "train_stats", "datastore"):
        assert key in info
    zs = info["models"]["zeroshot"]
    assert zs["type"] == "classification" and zs["dimension"] == 2
    assert isinstance(zs["config"], dict) and "nodule" in zs["labels"]
    assert info["datastore"]["total"] >= 5


def test_slicer_shaped_infer_round_trip(server):
    image = images(server, "chest")[0]
    r = slicer_post(f"{server.url}/infer/zeroshot?image={image}", {"label": "nodule", "largest_cc": False})
    assert r.status_code == 200, r.text
    parts = read_multipart(r)
    params = json.loads(parts["params"].content)
    assert len(params["findings"]) >= 6
    probs = [f["probability"] for f in params["findings"]]
    assert probs == sorted(probs, reverse=True) and all(0 <= p <= 1 for p in probs)
    (name, idx), = params["label_names"].items()
    assert name.startswith(params["findings"][0]["finding"]) and idx == 1
    assert params["latencies"]["total_ms"] > 0
    # the label comes back in the image's own format (PNG), same size as the image
    lab_path = server.tmp / "slicer_label.png"
    lab_path.write_bytes(parts["image"].content)
    lab = sitk.GetArrayFromImage(sitk.ReadImage(str(lab_path)))
    img = sitk.GetArrayFromImage(sitk.ReadImage(_download(server, image)))
    assert lab.shape == img.shape[:2] and lab.max() == 1


def test_zeroshot_scores_negated_free_text_from_the_affirmed_finding(server):
    image = images(server, "chest")[0]
    r = slicer_post(f"{server.url}/infer/zeroshot?image={image}&output=json",
                    {"prompts": ["no pleural effusion", "free of cardiomegaly"]})
    assert r.status_code == 200, r.text
    p = {f["finding"]: f["probability"] for f in r.json()["findings"]}
    assert abs(p["no pleural effusion"] - (1 - p["pleural effusion"])) < 2e-4
    assert abs(p["free of cardiomegaly"] - (1 - p["cardiomegaly"])) < 2e-4
    r = slicer_post(f"{server.url}/infer/zeroshot?image={image}&output=json", {"prompts": ["no"]})
    assert r.status_code == 422 and "prompt" in r.json()["detail"], r.text


def _download(server, image):
    r = requests.get(f"{server.url}/datastore/image", params={"image": image})
    assert r.status_code == 200
    ext = ".nii.gz" if image.startswith("ct") else ".png"
    p = server.tmp / f"dl_{image}{ext}"
    p.write_bytes(r.content)
    return str(p)


def test_ohif_shaped_infer_returns_raw_nrrd(server):
    image = images(server, "ct")[0]
    params = {"result_extension": ".nrrd", "result_dtype": "uint8", "result_compress": False,
              "restore_label_idx": False, "slice": 5}
    r = requests.post(f"{server.url}/infer/zeroshot", params={"image": image, "output": "image"},
                      files={"params": (None, json.dumps(params))})
    assert r.status_code == 200, r.text
    path = server.tmp / "ohif.nrrd"
    path.write_bytes(r.content)
    data, header = nrrd.read(str(path))
    vol = sitk.GetArrayFromImage(sitk.ReadImage(_download(server, image)))
    assert header["type"] in ("uint8", "unsigned char")
    assert tuple(header["sizes"]) == tuple(reversed(vol.shape))  # NRRD sizes are IJK
    # the frame sits on the requested slice k=5 only
    assert data[..., 5].max() == 1 and data[..., 4].max() == 0


def test_label_save_and_read_back(server, studies):
    image = images(server, "chest")[-1]
    img = sitk.GetArrayFromImage(sitk.ReadImage(_download(server, image)))
    lab = np.zeros(img.shape[:2], np.uint8)
    lab[100:140, 200:260] = 3
    path = server.tmp / "mylabel.png"
    sitk.WriteImage(sitk.GetImageFromArray(lab), str(path))
    params = {"label_info": [{"name": "consolidation", "idx": 3}], "model": "zeroshot"}
    r = requests.put(f"{server.url}/datastore/label", params={"image": image, "tag": "final"},
                     files={"label": ("mylabel.png", path.read_bytes()), "params": (None, json.dumps(params))})
    assert r.status_code == 200, r.text
    back = requests.get(f"{server.url}/datastore/label", params={"label": image, "tag": "final"})
    assert back.status_code == 200
    got = server.tmp / "back.png"
    got.write_bytes(back.content)
    assert np.array_equal(sitk.GetArrayFromImage(sitk.ReadImage(str(got))), lab)
    info = requests.get(f"{server.url}/datastore/label/info", params={"label": image, "tag": "final"}).json()
    assert info["label_info"][0]["name"] == "consolidation"


@pytest.mark.parametrize("case", ["unknown_model", "bad_json", "point_outside", "missing_image", "no_image_id",
                                  "label_not_image", "label_wrong_shape", "infer_file_not_image"])
def test_bad_input_gets_4xx_with_a_message_and_server_keeps_serving(server, case):
    chest = images(server, "chest")[0]
    before = requests.get(server.url + "/datastore/?output=all").json()
    url = f"{server.url}/infer/zeroshot?image={chest}"
    if case == "unknown_model":
        r = requests.post(f"{server.url}/infer/nosuchmodel?image={chest}", files={"params": (None, "{}")})
        want, words = 404, "unknown model"
    elif case == "bad_json":
        r = requests.post(url, files={"params": (None, "{'foreground': [[1, 2")})
        want, words = 400, "malformed JSON"
    elif case == "point_outside":
        r = requests.post(url, files={"params": (None, json.dumps({"foreground": [[5000, 10, 0]]}))})
        want, words = 422, "outside the image"
    elif case == "missing_image":
        r = requests.post(f"{server.url}/infer/zeroshot?image=no_such_image", files={"params": (None, "{}")})
        want, words = 404, "not in the datastore"
    elif case == "no_image_id":
        r = requests.post(f"{server.url}/infer/zeroshot", files={"params": (None, "{}")})
        want, words = 400, "image"
    elif case == "label_not_image":
        r = requests.put(f"{server.url}/datastore/label", params={"image": chest, "tag": "final"},
                         files={"label": ("label.nii.gz", b"this is not an image at all"), "params": (None, "{}")})
        want, words = 422, "not a readable image"
    elif case == "label_wrong_shape":
        buf = server.tmp / "small.png"
        sitk.WriteImage(sitk.GetImageFromArray(np.ones((10, 10), np.uint8)), str(buf))
        r = requests.put(f"{server.url}/datastore/label", params={"image": chest, "tag": "final"},
                         files={"label": ("small.png", buf.read_bytes()), "params": (None, "{}")})
        want, words = 422, "does not match"
    else:
        r = requests.post(f"{server.url}/infer/zeroshot",
                          files={"file": ("upload.png", b"\x89PNG garbage"), "params": (None, "{}")})
        want, words = 422, "not a readable image"
    assert r.status_code == want, r.text
    assert words in r.json()["detail"]
    assert_still_serving(server)
    after = requests.get(server.url + "/datastore/?output=all").json()
    assert after["objects"].keys() == before["objects"].keys()
    for k, obj in before["objects"].items():  # nothing lost or overwritten
        assert after["objects"][k]["labels"].keys() == obj["labels"].keys()
