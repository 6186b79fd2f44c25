"""The CUDA paths: every trainer on the GPU (bf16 autocast) and GPU inference matching CPU inference.

Skipped where no CUDA device is present (CI); run on a GPU machine with `pytest tests/test_cuda.py`.
"""
import numpy as np
import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from test_region_model import make_tiny_clip

    return make_tiny_clip(tmp_path_factory.mktemp("tiny_clip"))


@pytest.fixture(scope="module")
def default_pair():
    """The embedded default CLIP on CPU and on CUDA."""
    from clinlens.models.clip import load_clip

    return load_clip(None, device="cpu"), load_clip(None, device="cuda")


def _derm_items(n, seed=0):
    from clinlens.trainers.concepts import phantom_concept_items

    return phantom_concept_items("derm", seed, n)


def test_train_default_on_cuda_publishes_a_cpu_loadable_model(tmp_path):
    from clinlens.models.clip import load_clip
    from clinlens.trainers.default_clip import train_default

    s = train_default(tmp_path / "clip", seed=0, steps=30, batch=16, counts={"chest": 8, "derm": 8, "ct": 2},
                      size=224, device="cuda", progress=False, log=lambda *_: None)
    assert s["device"].startswith("cuda") and np.isfinite(s["final_loss"])
    b = load_clip(tmp_path / "clip", device="cpu")
    assert all(p.device.type == "cpu" and torch.isfinite(p).all() for p in b.model.parameters())


def test_default_clip_embeddings_match_between_cpu_and_cuda(default_pair):
    cpu, gpu = default_pair
    imgs = np.random.default_rng(0).random((3, 224, 224, 3)).astype(np.float32)
    texts = ["pleural effusion", "no pleural effusion", "melanoma"]
    with torch.no_grad():
        a = cpu.encode_images(cpu.pixel_values(imgs))
        b = gpu.encode_images(gpu.pixel_values(imgs))
    assert b.device.type == "cuda"
    torch.testing.assert_close(b.cpu(), a, atol=2e-3, rtol=2e-3)
    torch.testing.assert_close(gpu.encode_texts(texts).cpu(), cpu.encode_texts(texts), atol=2e-3, rtol=2e-3)


def test_region_training_on_cuda_improves_dice(tiny, tmp_path):
    from test_region_training import _dice

    from clinlens.models.clip import load_clip
    from clinlens.models.region_clip import RegionCLIP
    from clinlens.models.region_predictor import RegionPredictor
    from clinlens.trainers.region_seg import phantom_region_examples, train_region

    bundle = load_clip(tiny, device="cuda")
    objects = list(phantom_region_examples(seed=0, n=24, propagation=False))
    torch.manual_seed(0)
    before = _dice(RegionPredictor(RegionCLIP(bundle.model).eval(), bundle), objects)
    out = tmp_path / "region.safetensors"
    s = train_region(bundle, objects, out, steps=150, batch=8, lr=2e-3, seed=0, progress=False, log=lambda *_: None)
    assert s["device"].startswith("cuda") and np.isfinite(s["final_loss"])
    after = _dice(RegionPredictor.from_bundle(bundle, out), objects)
    print(f"cuda dice before {before:.3f} after {after:.3f}")
    assert after > before + 0.05


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="NCCL takes one GPU per rank: needs two GPUs")
def test_region_ddp_with_nccl(tiny, tmp_path):
    """MONAI Label's multi-GPU pattern (spawn + DDP) on the NCCL backend, one rank per visible GPU."""
    from clinlens.trainers.region_seg import phantom_region_examples, train_region_ddp

    objects = list(phantom_region_examples(seed=0, n=8, propagation=False))
    out = tmp_path / "ddp" / "region.safetensors"
    n = torch.cuda.device_count()
    s = train_region_ddp(tiny, objects, out, world_size=n, backend="nccl", steps=6, batch=4, seed=0, progress=False)
    assert s["world_size"] == n and s["replicas_in_sync"] is True and out.is_file()


def test_region_predictor_on_cuda_matches_cpu(default_pair):
    from clinlens.data.phantoms import make_chest
    from clinlens.models.region_predictor import RegionPredictor

    cpu, gpu = default_pair
    ph = make_chest(3, findings=["pleural effusion"])
    img = np.repeat(ph.image[..., None], 3, -1).astype(np.float32)
    mask = ph.masks["pleural effusion"]
    ys, xs = np.nonzero(mask)
    click = [(float(xs.mean()), float(ys.mean()))]
    a = RegionPredictor.from_bundle(cpu).predict(img, "a", fg_xy=click)
    b = RegionPredictor.from_bundle(gpu).predict(img, "a", fg_xy=click)
    inter, union = (a["mask"] & b["mask"]).sum(), (a["mask"] | b["mask"]).sum()
    assert union > 0 and inter / union > 0.95


@pytest.mark.parametrize("method,blocks,gradient", [("medgrad", 1, "exact"), ("medgrad", 6, "exact"),
                                                     ("grad_eclip", 1, "exact"), ("medgrad", 6, "direct")])
def test_explain_on_cuda_matches_cpu(default_pair, method, blocks, gradient):
    from clinlens.explain.grad_eclip import explain

    cpu, gpu = default_pair
    img = _derm_items(1, seed=3)[0][1]
    kw = dict(target_text="melanoma", method=method, blocks=blocks, gradient=gradient, words=False)
    a, b = explain(cpu, image=img, **kw), explain(gpu, image=img, **kw)
    assert abs(a["cosine"] - b["cosine"]) < 2e-3
    if a["scale"] > 0:
        r = np.corrcoef(a["heatmap"].ravel(), b["heatmap"].ravel())[0, 1]
        assert r > 0.98, r


def test_negation_tuning_on_cuda_tunes_only_text(tiny, tmp_path):
    from safetensors.torch import load_file

    from clinlens.trainers.negation import train_negation

    s = train_negation(tiny, tmp_path / "tuned", loss="con2", steps=4, batch=8, lr=1e-3, n_images=8, seed=0,
                       device="cuda", progress=False, log=lambda *_: None)
    assert s["device"].startswith("cuda")
    base, tuned = load_file(str(tiny / "model.safetensors")), load_file(str(tmp_path / "tuned" / "model.safetensors"))
    vision = [k for k in base if k.startswith(("vision_model.", "visual_projection."))]
    text = [k for k in base if k.startswith("text_model.")]
    assert all(torch.equal(base[k], tuned[k]) for k in vision)
    assert any(not torch.equal(base[k], tuned[k]) for k in text)


def test_concept_and_prompt_training_on_cuda(tiny, tmp_path):
    from clinlens.data.phantoms import DERM_CONCEPTS, DERM_DIAGNOSES
    from clinlens.models.clip import load_clip
    from clinlens.models.csr import CSRModel
    from clinlens.models.prompt_learner import ClinCoCoOp
    from clinlens.trainers.concepts import train_csr
    from clinlens.trainers.prompt_learning import train_prompt_learner

    gpu = load_clip(tiny, device="cuda")
    items = _derm_items(24)
    s = train_csr(gpu, items, tmp_path / "csr.safetensors", DERM_CONCEPTS, DERM_DIAGNOSES, steps=20, batch=8,
                  progress=False, log=lambda *_: None)
    assert s["device"].startswith("cuda") and np.isfinite(s["final_loss"])
    p = train_prompt_learner(gpu, items, tmp_path / "prompt.safetensors", DERM_CONCEPTS, DERM_DIAGNOSES, steps=10,
                             batch=8, progress=False, log=lambda *_: None)
    assert np.isfinite(p["final_loss"])
    cpu = load_clip(tiny, device="cpu")  # the published files load and agree on CPU
    pv = cpu.pixel_values(np.stack([it[1] for it in items[:4]]))
    a, b = CSRModel.load(cpu, tmp_path / "csr.safetensors"), CSRModel.load(gpu, tmp_path / "csr.safetensors")
    with torch.no_grad():
        torch.testing.assert_close(b(pv.cuda())["logits"].cpu(), a(pv)["logits"], atol=2e-3, rtol=2e-3)
        pa = ClinCoCoOp.load(cpu, tmp_path / "prompt.safetensors")(pv)["logits"]
        pb = ClinCoCoOp.load(gpu, tmp_path / "prompt.safetensors")(pv.cuda())["logits"]
    torch.testing.assert_close(pb.cpu(), pa, atol=2e-3, rtol=2e-3)


def test_fine_tuned_csr_at_a_larger_input_on_cuda(tiny, tmp_path):
    """CSR with its own backbone on a 2x input trains on CUDA (bf16 autocast) and loads and agrees on CPU."""
    from clinlens.data.phantoms import DERM_CONCEPTS, DERM_DIAGNOSES
    from clinlens.models.clip import load_clip
    from clinlens.models.csr import CSRModel
    from clinlens.trainers.concepts import train_csr

    gpu = load_clip(tiny, device="cuda")
    S = 2 * gpu.image_size
    items = _derm_items(16)
    s = train_csr(gpu, items, tmp_path / "csr.safetensors", DERM_CONCEPTS, DERM_DIAGNOSES, steps=10, batch=4,
                  finetune_backbone=True, input_size=S, progress=False, log=lambda *_: None)
    assert s["device"].startswith("cuda") and s["backbone_lr"] > 0 and np.isfinite(s["final_loss"])
    cpu = load_clip(tiny, device="cpu")
    a, b = CSRModel.load(cpu, tmp_path / "csr.safetensors"), CSRModel.load(gpu, tmp_path / "csr.safetensors")
    assert a.image_size == S and a.config["finetune_backbone"]
    pv = cpu.pixel_values(np.stack([it[1] for it in items[:4]]), S)
    with torch.no_grad():
        torch.testing.assert_close(b(pv.cuda())["logits"].cpu(), a(pv)["logits"], atol=2e-3, rtol=2e-3)
