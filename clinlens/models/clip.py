"""CLIP backbone: the embedded default, any local Hugging Face CLIP directory, and encoders.

One setting picks the checkpoint: `--conf clip_model DIR` on the server, or the
`CLINLENS_CLIP_MODEL` environment variable; otherwise the default trained by
`clinlens train-default` and shipped in `clinlens/assets/default_clip`. Nothing is downloaded.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

DEFAULT_CLIP_DIR = Path(__file__).resolve().parent.parent / "assets" / "default_clip"
ENV_VAR = "CLINLENS_CLIP_MODEL"
CONF_KEY = "clip_model"
_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def resolve_clip_dir(conf: dict | None = None) -> Path:
    """The CLIP directory chosen by `--conf clip_model`, then `$CLINLENS_CLIP_MODEL`, then the default."""
    choice = (conf or {}).get(CONF_KEY) or os.environ.get(ENV_VAR) or str(DEFAULT_CLIP_DIR)
    path = Path(choice).expanduser()
    if not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"CLIP model directory {path} has no config.json. Point `--conf {CONF_KEY}` or ${ENV_VAR} "
            "at a local Hugging Face CLIP directory, or run `clinlens train-default` to rebuild the default."
        )
    return path


def vision_depth(path: str | Path) -> int:
    """The number of vision blocks of the HF CLIP directory at `path`, read from its config.json alone."""
    cfg = json.loads((Path(path) / "config.json").read_text())
    return int(cfg.get("vision_config", {}).get("num_hidden_layers", 12))  # 12: transformers' CLIPVisionConfig default


def vision_trunk(vision_model, pixel_values: torch.Tensor, n_layers: int) -> torch.Tensor:
    """(B, 3, S, S) normalised pixels -> hidden states (B, 1 + h*w, D) after the embeddings, the pre-LN and
    the first `n_layers` encoder blocks; an S other than the CLIP's own interpolates the position embeddings."""
    other = tuple(pixel_values.shape[-2:]) != (vision_model.config.image_size,) * 2
    h = vision_model.pre_layrnorm(vision_model.embeddings(pixel_values, interpolate_pos_encoding=other))
    for layer in vision_model.encoder.layers[:n_layers]:
        h = layer(h, None)
    return h


def small_clip_config(vocab_size: int, pad_id: int, bos_id: int, eos_id: int, **over):
    """The embedded default: a few million parameters, fast enough for a click on 2 CPU cores."""
    from transformers import CLIPConfig

    text = dict(vocab_size=vocab_size, hidden_size=128, intermediate_size=512, num_hidden_layers=4,
                num_attention_heads=4, max_position_embeddings=48, pad_token_id=pad_id,
                bos_token_id=bos_id, eos_token_id=eos_id)
    vision = dict(image_size=224, patch_size=16, hidden_size=128, intermediate_size=512,
                  num_hidden_layers=6, num_attention_heads=4, num_channels=3)
    text.update(over.pop("text", {}))
    vision.update(over.pop("vision", {}))
    return CLIPConfig(text_config=text, vision_config=vision, projection_dim=128, **over)


@dataclass
class Preprocess:
    """Image size and normalisation the checkpoint expects."""

    image_size: int
    mean: tuple = _CLIP_MEAN
    std: tuple = _CLIP_STD

    @classmethod
    def from_dir(cls, path: Path, image_size: int) -> "Preprocess":
        pre = path / "preprocessor_config.json"
        if pre.is_file():
            cfg = json.loads(pre.read_text())
            return cls(image_size, tuple(cfg.get("image_mean", _CLIP_MEAN)), tuple(cfg.get("image_std", _CLIP_STD)))
        return cls(image_size)


@dataclass
class ClipBundle:
    """A loaded CLIP: model, tokenizer, preprocessing, and where it came from."""

    model: "torch.nn.Module"
    tokenizer: object
    preprocess: Preprocess
    path: Path
    device: torch.device
    mtime: float = 0.0
    _text_cache: dict = field(default_factory=dict, repr=False)

    @property
    def image_size(self) -> int:
        return self.preprocess.image_size

    def pixel_values(self, images: np.ndarray | torch.Tensor, size: int | None = None) -> torch.Tensor:
        """(B, H, W, 3) or (B, 3, H, W) floats in [0, 1] -> normalised (B, 3, S, S) on the model's device;
        S = `size`, default the CLIP's input size."""
        x = torch.as_tensor(images, dtype=torch.float32)
        if x.ndim == 3:
            x = x[None]
        if x.shape[-1] == 3 and x.shape[1] != 3:
            x = x.permute(0, 3, 1, 2)
        s = int(size or self.image_size)
        if x.shape[-2:] != (s, s):
            x = F.interpolate(x, size=(s, s), mode="bilinear", align_corners=False, antialias=True)
        mean = torch.tensor(self.preprocess.mean).view(1, 3, 1, 1)
        std = torch.tensor(self.preprocess.std).view(1, 3, 1, 1)
        return ((x - mean) / std).to(self.device)

    def tokenize(self, texts: list[str]) -> dict:
        max_len = self.model.config.text_config.max_position_embeddings
        enc = self.tokenizer(list(texts), padding=True, truncation=True, max_length=max_len, return_tensors="pt")
        return {k: v.to(self.device) for k, v in enc.items() if k in ("input_ids", "attention_mask")}

    def encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """L2-normalised image embeddings."""
        out = self.model.vision_model(pixel_values=pixel_values)
        return F.normalize(self.model.visual_projection(out.pooler_output), dim=-1)

    def encode_texts(self, texts: list[str], cache: bool = True) -> torch.Tensor:
        """L2-normalised text embeddings; cached per text at inference time."""
        key = tuple(texts)
        if cache and not self.model.training and key in self._text_cache:
            return self._text_cache[key]
        out = self.model.text_model(**self.tokenize(texts))
        emb = F.normalize(self.model.text_projection(out.pooler_output), dim=-1)
        if cache and not self.model.training:
            self._text_cache[key] = emb.detach()
        return emb

    @property
    def logit_scale(self) -> torch.Tensor:
        return self.model.logit_scale.exp().clamp(max=100)


def load_clip(path: str | Path | None = None, device: str | torch.device | None = None, conf: dict | None = None) -> ClipBundle:
    """Load a local HF CLIP directory (offline); `path=None` resolves the configured one."""
    from transformers import AutoTokenizer, CLIPModel

    path = Path(path) if path is not None else resolve_clip_dir(conf)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path} is not a Hugging Face CLIP directory (no config.json)")
    device = torch.device(device) if device is not None else default_device()
    model = CLIPModel.from_pretrained(str(path), local_files_only=True).to(device).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    weights = path / "model.safetensors"
    mtime = weights.stat().st_mtime if weights.exists() else 0.0
    pre = Preprocess.from_dir(path, model.config.vision_config.image_size)
    return ClipBundle(model=model, tokenizer=tokenizer, preprocess=pre, path=path, device=device, mtime=mtime)


TEXT_KEYS = ("text_model.", "text_projection.", "logit_scale")


def load_text_tower(bundle: ClipBundle, tuned_dir: str | Path) -> None:
    """Replace the text tower (and logit scale) of `bundle` with those of the CLIP at `tuned_dir`, a
    text-only fine-tune of the same model (`clinlens train-negation`); the image tower stays."""
    from safetensors.torch import load_file

    state = {k: v for k, v in load_file(str(Path(tuned_dir) / "model.safetensors")).items() if k.startswith(TEXT_KEYS)}
    own = bundle.model.state_dict()
    bad = [k for k, v in state.items() if k not in own or own[k].shape != v.shape]
    if not state or bad:
        raise ValueError(f"{tuned_dir} is not a text fine-tune of {bundle.path} (mismatched: {bad[:3] or 'no text weights'})")
    bundle.model.load_state_dict(state, strict=False)
    bundle._text_cache.clear()


class LazyClip:
    """Loads the configured CLIP on first use and reloads it when its weights file changes.

    `text_dir`: where the `negation` train task publishes a text-tuned copy of this CLIP; when it
    has weights, its text tower replaces the configured one (the image tower, and every model
    trained on it, stay). The MONAI Label training subprocess rebuilds the app, so nothing may load
    at construction.
    """

    def __init__(self, conf: dict | None = None, device: str | None = None, text_dir: str | Path | None = None):
        self.conf = dict(conf or {})
        self.device = device
        self.text_dir = Path(text_dir) if text_dir else None
        self._bundle: ClipBundle | None = None
        self._stamp = None
        self.listeners: list = []  # callables run after a (re)load, e.g. to drop caches

    @property
    def path(self) -> Path:
        return resolve_clip_dir(self.conf)

    def _tuned(self) -> Path | None:
        if self.text_dir is not None and (self.text_dir / "model.safetensors").is_file():
            return self.text_dir
        return None

    def get(self) -> ClipBundle:
        path = self.path
        weights = path / "model.safetensors"
        tuned = self._tuned()
        stamp = (str(path), weights.stat().st_mtime if weights.exists() else 0.0,
                 (tuned / "model.safetensors").stat().st_mtime if tuned else None)
        if self._bundle is None or stamp != self._stamp:
            bundle = load_clip(path, device=self.device)
            if tuned is not None:
                load_text_tower(bundle, tuned)
            self._bundle, self._stamp = bundle, stamp
            for fn in self.listeners:
                fn(self._bundle)
        return self._bundle
