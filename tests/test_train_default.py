"""`clinlens train-default` reproduces its checkpoint from a seed and publishes it atomically."""
import json
import subprocess
import sys

import torch
from safetensors.torch import load_file

from clinlens.models.clip import load_clip
from clinlens.trainers.default_clip import train_default

TINY = dict(steps=12, batch=16, counts={"chest": 12, "derm": 8, "ct": 2}, progress=False, device="cpu")


def test_same_seed_same_weights_and_training_moves_them(tmp_path):
    a = train_default(tmp_path / "a", seed=3, **TINY, log=lambda *_: None)
    b = train_default(tmp_path / "b", seed=3, **TINY, log=lambda *_: None)
    wa, wb = load_file(tmp_path / "a" / "model.safetensors"), load_file(tmp_path / "b" / "model.safetensors")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    train_default(tmp_path / "c", seed=4, **TINY, log=lambda *_: None)
    wc = load_file(tmp_path / "c" / "model.safetensors")
    assert not all(torch.equal(wa[k], wc[k]) for k in wa)
    assert a["final_loss"] == b["final_loss"]
    # published by rename: only the final directories, no temporary ones left behind
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b", "c"]
    bundle = load_clip(tmp_path / "a", device="cpu")
    assert bundle.model.config.text_config.eos_token_id == bundle.tokenizer.eos_token_id


def test_cli_help_lists_the_subcommands():
    out = subprocess.run([sys.executable, "-m", "clinlens.cli", "--help"], capture_output=True, text=True, check=True).stdout
    for cmd in ("serve", "demo", "make-data", "train-default"):
        assert cmd in out


def test_phantom_pairs_from_worker_processes_equal_the_serial_ones():
    import numpy as np

    from clinlens.data.pairs import build_pairs

    counts = {"chest": 5, "derm": 4, "ct": 2}
    a = build_pairs(counts, seed=2, size=64, progress=False, workers=1)
    b = build_pairs(counts, seed=2, size=64, progress=False, workers=2)
    assert len(a) > sum(counts.values())  # region crops too
    assert np.array_equal(a.array(), b.array())
    for field in ("captions", "positives", "kind", "family", "labels"):
        assert getattr(a, field) == getattr(b, field), field


def test_train_default_retrains_only_the_named_concept_families(tmp_path):
    """`--concepts-only --families derm` leaves the other families' files alone; `--scale` shrinks its phantoms."""
    import json
    import shutil

    from clinlens.models.clip import DEFAULT_CLIP_DIR

    for f in DEFAULT_CLIP_DIR.iterdir():  # the CLIP and the committed chest model, not derm's
        if not f.name.startswith(("csr_", "prompt_")) or f.name.startswith("csr_chest"):
            shutil.copy(f, tmp_path / f.name)
    before = (tmp_path / "csr_chest.safetensors").read_bytes()
    subprocess.run([sys.executable, "-m", "clinlens.cli", "train-default", "--concepts-only", "--families", "derm",
                    "--scale", "0.05", "--device", "cpu", "--out", str(tmp_path)], check=True, capture_output=True)
    rec = json.loads((tmp_path / "csr_derm.json").read_text())["training"]
    assert rec["family"] == "derm" and rec["images"] == 12 and rec["steps"] == 15
    assert (tmp_path / "prompt_derm.safetensors").is_file()
    assert not any((tmp_path / f"{k}_ct.safetensors").exists() for k in ("csr", "prompt"))
    assert not (tmp_path / "prompt_chest.safetensors").exists()
    assert (tmp_path / "csr_chest.safetensors").read_bytes() == before
    bad = subprocess.run([sys.executable, "-m", "clinlens.cli", "train-default", "--concepts-only", "--families",
                          "lung", "--out", str(tmp_path)], capture_output=True, text=True)
    assert bad.returncode == 2 and "lung" in bad.stderr
    clash = subprocess.run([sys.executable, "-m", "clinlens.cli", "train-default", "--region-only", "--families",
                            "derm", "--out", str(tmp_path)], capture_output=True, text=True)
    assert clash.returncode == 2 and "--families" in clash.stderr


def test_prune_prototypes_cli_publishes_to_the_served_model_dir(tmp_path):
    """`clinlens prune-prototypes`: the served model loses those prototypes, published where the server reads it;
    the shipped file is untouched; an unknown id exits 2 and names it."""
    from clinlens.models.clip import DEFAULT_CLIP_DIR, LazyClip
    from clinlens.models.csr import CSRModel
    from clinlens.trainers.concepts import csr_file

    shipped = csr_file(DEFAULT_CLIP_DIR, "derm")
    before = shipped.read_bytes()
    cli = [sys.executable, "-m", "clinlens.cli", "prune-prototypes", "--family", "derm", "--model-dir", str(tmp_path),
           "--n-images", "8"]
    subprocess.run([*cli, "--ids", "0", "5"], check=True, capture_output=True, text=True)
    bundle = LazyClip().get()
    pruned = CSRModel.load(bundle, csr_file(tmp_path, "derm"))
    full = CSRModel.load(bundle, shipped)
    assert sorted(pruned.proto_ids.tolist()) == sorted(set(full.proto_ids.tolist()) - {0, 5})
    assert shipped.read_bytes() == before
    # the next pruning starts from the served (already pruned) model: 0 is gone there
    bad = subprocess.run([*cli, "--ids", "0"], capture_output=True, text=True)
    assert bad.returncode == 2 and "unknown prototype id(s) [0]" in bad.stderr
    subprocess.run([*cli, "--ids", "7"], check=True, capture_output=True, text=True)
    assert sorted(CSRModel.load(bundle, csr_file(tmp_path, "derm")).proto_ids.tolist()) == sorted(
        set(full.proto_ids.tolist()) - {0, 5, 7})
    # a model trained on the datastore is not refitted on phantoms: refused, pointing at the train task
    meta = csr_file(tmp_path, "derm").with_suffix(".json")
    record = json.loads(meta.read_text())
    record["training"]["source"] = "datastore"
    meta.write_text(json.dumps(record))
    served = csr_file(tmp_path, "derm").read_bytes()
    bad = subprocess.run([*cli, "--ids", "9"], capture_output=True, text=True)
    assert bad.returncode == 2 and "trained on the datastore" in bad.stderr and "/train/concepts" in bad.stderr
    assert csr_file(tmp_path, "derm").read_bytes() == served
