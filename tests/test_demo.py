"""`clinlens demo`: the scripted session runs against a real server and writes a readable report."""
import json

import numpy as np
import SimpleITK as sitk


def test_demo_writes_report_and_overlays_without_touching_the_studies(studies, tmp_path):
    from clinlens.demo import run_demo

    before = sorted(p.relative_to(studies).as_posix() for p in studies.rglob("*") if p.is_file()
                    and "datastore" not in p.name and ".lock" not in p.name and "logs" not in p.parts)
    report = run_demo(studies, tmp_path / "demo")
    text = report.read_text()
    families = {r["family"] for r in json.loads((studies / "clinlens" / "index.json").read_text())["images"]}
    assert text.count("## ") == len(families) and "Saved a corrected label" in text and "HTTP 200" in text
    for fam in families:
        png = next(p for p in (tmp_path / "demo").glob(f"{fam}_*.png") if "_region" not in p.name)
        img = sitk.GetArrayFromImage(sitk.ReadImage(str(png)))
        assert img.shape[0] > 300 and img.std() > 10  # a drawn figure, not a blank page
    assert "what is here" in text
    after = sorted(p.relative_to(studies).as_posix() for p in studies.rglob("*") if p.is_file()
                   and "datastore" not in p.name and ".lock" not in p.name and "logs" not in p.parts)
    assert after == before  # the session ran on a copy
    assert np.all([(tmp_path / "demo" / "studies" / f).exists() for f in before])
