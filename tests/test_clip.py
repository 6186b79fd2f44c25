"""Backbone loading: the committed default, and any local HF CLIP directory through one setting."""
import json

import numpy as np
import pytest
import torch

from clinlens.models.clip import CONF_KEY, DEFAULT_CLIP_DIR, ENV_VAR, LazyClip, load_clip, resolve_clip_dir
from clinlens.text.tokenizer import build_tokenizer


@pytest.fixture(scope="module")
def vitb16_dir(tmp_path_factory):
    """A ViT-B/16-shaped CLIP with random weights, created locally (nothing downloaded)."""
    from transformers import CLIPConfig, CLIPModel

    d = tmp_path_factory.mktemp("vitb16")
    tok = build_tokenizer(["a chest x-ray with a nodule.", "no pleural effusion."], d, max_length=77)
    ids = {k: tok.convert_tokens_to_ids(getattr(tok, k)) for k in ("pad_token", "bos_token", "eos_token")}
    cfg = CLIPConfig(
        text_config=dict(vocab_size=len(tok), hidden_size=512, intermediate_size=2048, num_hidden_layers=1,
                         num_attention_heads=8, max_position_embeddings=77, pad_token_id=ids["pad_token"],
                         bos_token_id=ids["bos_token"], eos_token_id=ids["eos_token"]),
        vision_config=dict(image_size=224, patch_size=16, hidden_size=768, intermediate_size=3072,
                           num_hidden_layers=12, num_attention_heads=12),
        projection_dim=512,
    )
    torch.manual_seed(0)
    CLIPModel(cfg).save_pretrained(str(d))
    (d / "preprocessor_config.json").write_text(json.dumps({"image_mean": [0.5, 0.5, 0.5], "image_std": [0.25, 0.25, 0.25]}))
    return d


def test_default_checkpoint_is_small_and_loads_offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv(ENV_VAR, raising=False)
    size = sum(f.stat().st_size for f in DEFAULT_CLIP_DIR.iterdir())
    assert size <= 25 * 2**20
    b = load_clip(device="cpu")
    assert b.path == DEFAULT_CLIP_DIR
    # pooling trap: the config's EOS must be the tokenizer's, and not the legacy id 2
    assert b.model.config.text_config.eos_token_id == b.tokenizer.eos_token_id != 2
    enc = b.tokenize(["no pleural effusion."])
    assert enc["input_ids"][0, -1].item() == b.tokenizer.eos_token_id
    assert b.tokenizer.unk_token_id not in enc["input_ids"][0].tolist()


def test_setting_via_env_and_conf_picks_a_vitb16_directory(vitb16_dir, monkeypatch):
    monkeypatch.setenv(ENV_VAR, str(vitb16_dir))
    assert resolve_clip_dir() == vitb16_dir
    monkeypatch.delenv(ENV_VAR)
    assert resolve_clip_dir({CONF_KEY: str(vitb16_dir)}) == vitb16_dir
    b = LazyClip({CONF_KEY: str(vitb16_dir)}, device="cpu").get()
    assert b.image_size == 224 and b.preprocess.mean == (0.5, 0.5, 0.5)
    with torch.no_grad():
        img = b.encode_images(b.pixel_values(np.random.rand(1, 300, 200, 3)))
        txt = b.encode_texts(["no pleural effusion.", "a nodule."])
    assert img.shape == (1, 512) and txt.shape == (2, 512)
    assert torch.allclose(img.norm(dim=-1), torch.ones(1), atol=1e-4)


def test_text_pools_at_eos_not_at_padding(vitb16_dir):
    """Padding a batch must not change a text's embedding: pooling sits at its own EOS."""
    b = load_clip(vitb16_dir, device="cpu")
    with torch.no_grad():
        alone = b.encode_texts(["no pleural effusion."], cache=False)
        padded = b.encode_texts(["no pleural effusion.", "a chest x-ray with a nodule and no pleural effusion."], cache=False)
    assert torch.allclose(alone[0], padded[0], atol=1e-5)


def test_bad_setting_gives_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="clinlens train-default"):
        resolve_clip_dir({CONF_KEY: str(tmp_path)})


def test_lazy_clip_reloads_when_weights_change(tmp_path):
    import os
    import shutil

    d = tmp_path / "clip"
    shutil.copytree(DEFAULT_CLIP_DIR, d)
    lazy = LazyClip({CONF_KEY: str(d)}, device="cpu")
    seen = []
    lazy.listeners.append(seen.append)
    first = lazy.get()
    assert lazy.get() is first and len(seen) == 1
    st = (d / "model.safetensors").stat()
    os.utime(d / "model.safetensors", (st.st_atime, st.st_mtime + 5))
    assert lazy.get() is not first and len(seen) == 2
