"""MedP-CLIP region-aware CLIP (methods.md §1, "Fusion" and "Segmentation").

The ViT of a Hugging Face `CLIPModel` is split in two:

- the *trunk* (embeddings, pre-LN, first L-k encoder layers) depends only on the image and is what
  a predictor caches per image;
- the last k layers run as *fusion blocks* (own copies, initialised from the CLIP). Before them the
  dense prompt map (mask embedding + region map) is added to the patch tokens through a
  zero-initialised projection (Alpha-CLIP's trick: at initialisation the global path is exactly the
  plain CLIP). A region [CLS] token (trunk [CLS] + learned offset) is appended; it attends to the
  patches with the bias `scale_h * log(eps + region_map)`, while the global [CLS] and the patches
  never attend to it, so the global context is unchanged.

Outputs: global embedding (the CLIP's own post-LN + projection), region embedding (own copies of
post-LN + projection on the region [CLS]), mask logits from `MaskDecoder` on the fused patch tokens
and the prompt tokens, and an IoU prediction.

Checkpoint: one safetensors file with only the region parts (config in its metadata, so the file
alone is complete and is replaced atomically) and a JSON copy of the config/summary beside it. The
trunk always comes from the CLIP directory.
"""
from __future__ import annotations

import copy
import hashlib
import json
import warnings
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from clinlens.models import checkpoint
from clinlens.models.clip import vision_trunk
from clinlens.models.mask_decoder import MaskDecoder
from clinlens.models.prompt_encoder import PromptEncoder

REGION_FILE = "region.safetensors"
FORMAT = "clinlens.region_clip/1"
_NEG = -1e4  # "never attend" (finite, so bf16 autocast stays NaN-free)


def region_path(clip_dir) -> Path:
    """Where the region model of a CLIP directory lives."""
    return Path(clip_dir) / REGION_FILE


class RegionCLIP(nn.Module):
    def __init__(self, clip_model, k: int = 2, dim: int | None = None, eps: float = 1e-2, point_sigma: float = 1.5,
                 decoder_depth: int = 2, decoder_heads: int = 4):
        super().__init__()
        vm, vc = clip_model.vision_model, clip_model.config.vision_config
        self.n_layers = vc.num_hidden_layers
        if not 1 <= k <= self.n_layers:
            raise ValueError(f"k={k} fusion blocks, but the CLIP ViT has {self.n_layers} layers")
        object.__setattr__(self, "_clip", clip_model)  # not a submodule: not saved, not trained
        self.k, self.eps = k, eps
        self.width, self.heads = vc.hidden_size, vc.num_attention_heads
        self.image_size = vc.image_size
        g = vc.image_size // vc.patch_size
        self.grid = (g, g)
        dim = dim or min(self.width, 256)
        self.config = dict(k=k, dim=dim, eps=eps, point_sigma=point_sigma, decoder_depth=decoder_depth,
                           decoder_heads=decoder_heads)
        self.prompt_encoder = PromptEncoder(dim, self.grid, (self.image_size, self.image_size), point_sigma=point_sigma)
        self.fusion_in = nn.Linear(dim + 1, self.width)  # [dense prompt, region map] -> patch tokens
        nn.init.zeros_(self.fusion_in.weight)
        nn.init.zeros_(self.fusion_in.bias)
        self.blocks = nn.ModuleList(copy.deepcopy(vm.encoder.layers[self.n_layers - k + i]) for i in range(k))
        self.region_offset = nn.Parameter(torch.zeros(self.width))
        self.attn_scale = nn.Parameter(torch.ones(self.heads))
        self.region_ln = copy.deepcopy(vm.post_layernorm)
        self.region_proj = copy.deepcopy(clip_model.visual_projection)
        self.decoder_in = nn.Sequential(nn.LayerNorm(self.width), nn.Linear(self.width, dim))
        self.decoder = MaskDecoder(dim, heads=decoder_heads, depth=decoder_depth)
        self.region_embed = nn.Parameter(torch.randn(dim) * 0.5)  # region map -> decoder's dense prompt
        for p in self.parameters():
            p.requires_grad_(True)
        self.to(next(clip_model.parameters()).device)

    # ------------------------------------------------------------------ parts
    @property
    def clip(self):
        return self._clip

    @property
    def device(self) -> torch.device:
        return self.region_offset.device

    def trunk(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) normalised pixels -> hidden (B, 1 + h*w, W) after the first L-k layers."""
        return vision_trunk(self._clip.vision_model, pixel_values, self.n_layers - self.k)

    def plain_from_trunk(self, hidden: torch.Tensor) -> torch.Tensor:
        """The unmodified CLIP's image embedding from a trunk output (reference for the global term)."""
        vm = self._clip.vision_model
        for layer in vm.encoder.layers[self.n_layers - self.k:]:
            hidden = layer(hidden, None)
        return F.normalize(self._clip.visual_projection(vm.post_layernorm(hidden[:, 0])), dim=-1)

    def attention_bias(self, region_map: torch.Tensor) -> torch.Tensor:
        """(B, h*w) region map -> additive mask (B, heads, T, T), T = 1 + h*w + 1 (region [CLS] last)."""
        b, n = region_map.shape
        t = n + 2
        bias = region_map.new_zeros(b, self.heads, t, t)
        bias[:, :, : t - 1, t - 1] = _NEG  # global [CLS] and patches ignore the region [CLS]
        logr = torch.log(self.eps + region_map.clamp(0, 1))  # (B, n)
        bias[:, :, t - 1, 1: t - 1] = self.attn_scale.view(1, -1, 1) * logr[:, None, :]
        return bias

    def forward_from_trunk(self, hidden, points=None, labels=None, boxes=None, mask_prompt=None) -> dict:
        """Prompts in model-input pixel coordinates (see `prompt_encoder`). Returns embeddings and mask logits."""
        b = hidden.shape[0]
        sparse, dense, region = self.prompt_encoder(points, labels, boxes, mask_prompt)
        if sparse.shape[0] != b:
            sparse, dense, region = (x.expand(b, *x.shape[1:]) for x in (sparse, dense, region))
        h, w = self.grid
        fuse_in = torch.cat([dense.flatten(2).transpose(1, 2), region[..., None]], -1)  # (B, hw, D+1)
        patches = hidden[:, 1:] + self.fusion_in(fuse_in.to(hidden.dtype))
        rcls = hidden[:, :1] + self.region_offset
        x = torch.cat([hidden[:, :1], patches, rcls], 1)
        bias = self.attention_bias(region).to(x.dtype)
        for blk in self.blocks:
            x = blk(x, bias)
        vm = self._clip.vision_model
        glob = F.normalize(self._clip.visual_projection(vm.post_layernorm(x[:, 0])), dim=-1)
        reg = F.normalize(self.region_proj(self.region_ln(x[:, -1])), dim=-1)
        img = self.decoder_in(x[:, 1:-1]).transpose(1, 2).reshape(b, -1, h, w)
        dec_dense = dense + self.region_embed.view(1, -1, 1, 1) * region.view(b, 1, h, w)
        logits, iou = self.decoder(img, self.prompt_encoder.pe.grid(h, w).to(img.dtype), sparse.to(img.dtype),
                                   dec_dense.to(img.dtype))
        return {"global_embedding": glob, "region_embedding": reg, "mask_logits": logits, "iou_pred": iou,
                "region_map": region}

    def forward(self, pixel_values, points=None, labels=None, boxes=None, mask_prompt=None) -> dict:
        return self.forward_from_trunk(self.trunk(pixel_values), points, labels, boxes, mask_prompt)

    # ------------------------------------------------------------------ checkpoint
    def clip_fingerprint(self) -> str:
        """A short hash of the backbone weights the region parts were built on."""
        vm = self._clip.vision_model
        h = hashlib.sha1()
        for t in (vm.embeddings.patch_embedding.weight, vm.encoder.layers[-1].mlp.fc2.weight):
            h.update(t.detach().float().cpu().numpy().tobytes())
        return h.hexdigest()[:16]

    def save(self, path, extra: dict | None = None) -> Path:
        """Publish the region parts atomically to `path` (.safetensors) and a JSON summary beside it."""
        meta = {"format": FORMAT, "config": json.dumps(self.config), "clip_fingerprint": self.clip_fingerprint()}
        return checkpoint.publish(path, self.state_dict(), meta, {**meta, "config": self.config, **(extra or {})})

    @classmethod
    def load(cls, bundle, path=None, device=None) -> "RegionCLIP":
        """Region parts from `path` (default: `region.safetensors` in the CLIP directory) on `bundle`'s CLIP."""
        path = Path(path) if path is not None else region_path(bundle.path)
        meta, state = checkpoint.read(path, FORMAT, "region model", "train one with `train_region_default`")
        model = cls(bundle.model, **json.loads(meta["config"]))
        if meta.get("clip_fingerprint") != model.clip_fingerprint():
            warnings.warn(f"{path} was trained on a different CLIP backbone than {bundle.path}; retrain it")
        model.load_state_dict(state, strict=True)
        return model.to(device or bundle.device).eval()


def dice_bce_loss(logits: torch.Tensor, target: torch.Tensor, eps: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Soft Dice and BCE between (B, 1, H, W) logits and targets in [0, 1]."""
    p = torch.sigmoid(logits).flatten(1)
    t = target.flatten(1)
    dice = 1 - (2 * (p * t).sum(1) + eps) / (p.sum(1) + t.sum(1) + eps)
    return dice.mean(), F.binary_cross_entropy_with_logits(logits, target)

