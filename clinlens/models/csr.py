"""Concept-based Similarity Reasoning, CSR (methods.md §2), with text-grounded concepts.

A plain `torch.nn.Module` on a Hugging Face `CLIPModel`; nothing here knows MONAI Label.

- **Features.** `f = post_LN(ViT patch tokens)`, (B, D, h, w) (`patch_features`); the vision tower
  is frozen (run under `no_grad`, not saved) unless `finetune_backbone=True` (an own, saved copy;
  with `tuned_blocks` k only its last k blocks train, and training caches the frozen trunk's output).
  `input_size` S (default the CLIP's, 224) sets the model input: a larger S interpolates the position
  embeddings for a finer patch grid (448 -> 28x28, 672 -> 42x42: the shipped chest model, whose findings
  are small).
- **Stage 1.** A 1x1 concept head gives the CAMs `cam_k = w_k · f + b_k`; concept logits are their
  max (or avg) pool, trained with multi-label BCE.
- **Stage 2.** Local concept vectors `v_k = Σ_hw softmax_hw(cam_k) · f(h,w)`. A drawn region for a
  concept replaces the CAM weights by the region's patch coverage, normalised: `v_k` is then the
  masked mean of the features ("drawn regions feed training most directly").
- **Drawn regions as patch supervision** (beyond the paper). Where a concept has a drawn region, its
  similarity maps should peak there: `L_region = −log Σ_{hw ∈ R} softmax_hw(S_km(h,w)/τ)` for each
  prototype m of the concept, weighted by its stage-3 soft assignment q_m to the region's vector
  (`region_mode="concept"`: once on the concept's soft-assigned map), τ = `region_temperature` (0.1 = 1/λ),
  weight `region_weight` (1). Stage 3's loss only separates concepts' prototypes from each other, so
  nothing kept a prototype off the background: chest maps peaked on normal lung. On validation
  phantoms (benchmarks/results/concepts_region_loss.md) chest pointing after pruning rose 0.330 ->
  0.673 and macro-F1 after pruning 0.195 -> 0.320; derm pointing 0.829 -> 0.820, F1 0.889 -> 0.868.
- **Stage 3.** Projector `P(f) = normalize(W_clip f + MLP(f))` and M prototypes per concept;
  `q_m = softmax_m(γ <p_km, v'>)`, `sim_k = Σ_m q_m <p_km, v'>` and the loss
  `-log exp(λ(sim_y − sδ)) / (exp(λ(sim_y − sδ)) + Σ_{k≠y} exp(λ sim_k))` with s = `margin_sign`
  (+1: SoftTriple's subtraction, the default; −1 adds δ).
- **Stage 4.** `S_km(h,w) = cos(p_km, P(f(h,w)))`, `s_km = max_hw (A ⊙ S_km)`, and a linear task head
  on the K·M scores (cross-entropy).

**Clinician interaction.** Boxes are pixel `[x0, y0, x1, y1]`, half-open, on the model input
(S×S after `ClipBundle.pixel_values`). A box covers every patch it overlaps: patch columns
`floor(x0·g/S) .. ceil(x1·g/S)` (exclusive), rows likewise. The importance map is A = 1 on patches of
positive boxes, 0 on patches of negative boxes (negative wins where both), α elsewhere when at least
one positive box is given, else 1 (with only negative boxes nothing is in focus, so the rest keeps
its weight). A weights the cosine shifted to [0, 2], `s_km = max_hw (A ⊙ (S_km + 1)) − 1`, so A = 0
reads as "no evidence" (cosine −1) rather than cosine 0, which would lift the mostly negative maps
(a deliberate change to the paper's `max(A ⊙ S)`; the box benchmark gains on both families with it).
The task head then reads the boxed scores recentred by the kept prototypes' mean drop (`box_shift`;
`box_recentre=False` is the paper's rule): a focus lowers every max, and the head, fitted on unboxed
scores, would take that fall for evidence against the classes with most weight; negative boxes alone
leave A = 1 outside them and are not recentred, their drop being the excluded evidence. The returned
`proto_scores` stay the boxed evidence.
`reject_concepts` zeroes those concepts' prototype scores before the task head (they drop out of the
linear head).

**Text grounding** (beyond the paper). Text anchors `t_k` are CLIP text embeddings of each concept's
name (and description) averaged over `zeroshot.POSITIVE_TEMPLATES`, in the CLIP joint space. The
projector's linear part starts as CLIP's own `visual_projection`, so at initialisation `P(f)` is
CLIP's projected patch token (MaskCLIP-style) and lives in the same space: prototypes start at
`normalize(t_k + σε)` (σ = `proto_init_noise`, default 0.5; σ=0 puts them exactly on `t_k`; at 0.1 the
M prototypes of a concept converged to near-identical maps, and 0.5 raised the pointing game after
pruning on validation phantoms, derm 0.762 -> 0.809 and chest 0.255 -> 0.306 over seeds), the concept head at
`w_k = W_clip^T t_k`, and `text_reg · mean(1 − cos(p_km, t_k))` keeps the prototypes near their
anchors. New concepts are added by text (`add_concept_by_text`).

**Atlas.** `build_atlas` ties each prototype to its nearest patch over the training images labelled
with its concept, as CSR's local concept vectors come from those (image id, pixel box on the model
input); `prune_prototypes` removes prototypes by id, `refit_task_head` refits the head on stored scores.
`firing_rates` says where each prototype fires: the share of images, each with a region (a drawn
"text marker", say), on whose region its map peaks; `prototypes_firing_on` picks those above a share
for pruning (beyond the paper's single-patch atlas).

Checkpoint: one safetensors file (config and atlas in its metadata), published atomically, plus a
JSON summary beside it; the frozen backbone always comes from the CLIP directory.
"""
from __future__ import annotations

import copy
import json
import math
import warnings
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from clinlens.models import checkpoint
from clinlens.models.clip import vision_trunk
from clinlens.models.region_clip import RegionCLIP
from clinlens.models.zeroshot import POSITIVE_TEMPLATES

CSR_FILE = "csr.safetensors"
FORMAT = "clinlens.csr/1"


def csr_path(clip_dir) -> Path:
    """Where the CSR model of a CLIP directory lives by default."""
    return Path(clip_dir) / CSR_FILE


def patch_features(vision_model, pixel_values: torch.Tensor, post_ln: bool = True) -> torch.Tensor:
    """(B, 3, S, S) normalised pixels -> (B, D, h, w) patch tokens of the last ViT layer (post-LN'd); an S
    other than the CLIP's own interpolates its position embeddings (a finer patch grid at a larger S)."""
    return features_from_hidden(vision_model, vision_trunk(vision_model, pixel_values, 0), 0, post_ln)


def features_from_hidden(vision_model, hidden: torch.Tensor, first_layer: int, post_ln: bool = True) -> torch.Tensor:
    """Hidden states (B, 1 + h*w, D) entering encoder block `first_layer` -> (B, D, h, w) patch features
    (the remaining blocks, then the post-LN)."""
    for layer in vision_model.encoder.layers[first_layer:]:
        hidden = layer(hidden, None)
    tok = hidden[:, 1:]
    if post_ln:
        tok = vision_model.post_layernorm(tok)
    b, n, d = tok.shape
    g = math.isqrt(n)
    if g * g != n:
        raise ValueError(f"{n} patch tokens do not form a square grid")
    return tok.transpose(1, 2).reshape(b, d, g, g)


@torch.no_grad()
def concept_text_embeddings(bundle, names: Sequence[str], descriptions: Sequence[str | None] | None = None,
                            templates=POSITIVE_TEMPLATES) -> torch.Tensor:
    """(K, E) L2-normalised CLIP text anchors: the mean over templates of the name (and description)."""
    descriptions = list(descriptions or [None] * len(names))
    out = []
    for name, desc in zip(names, descriptions):
        texts = [t.format(name) for t in templates] + ([desc] if desc else [])
        out.append(F.normalize(bundle.encode_texts(texts, cache=False).float().mean(0), dim=-1))
    return torch.stack(out)


def _depth(x) -> int:
    if hasattr(x, "ndim"):
        return int(x.ndim)
    if isinstance(x, (list, tuple)):
        return 1 + max((_depth(e) for e in x), default=0)
    return 0


def _per_image_boxes(boxes, batch: int) -> list[torch.Tensor]:
    """None | (4,) | (N, 4) shared by all images | (B, N, 4) or a list of B (N_i, 4) -> B tensors (N_i, 4)."""
    if boxes is None:
        return [torch.zeros(0, 4, dtype=torch.float64)] * batch
    d = _depth(boxes)
    if d == 3:
        per = [torch.as_tensor(b, dtype=torch.float64).reshape(-1, 4) for b in boxes]
    elif d in (1, 2):
        t = torch.as_tensor(boxes, dtype=torch.float64)
        if t.numel() % 4:
            raise ValueError(f"boxes must be [x0, y0, x1, y1] rows, got shape {tuple(t.shape)}")
        per = [t.reshape(-1, 4)] * batch
    else:
        raise ValueError(f"boxes must be [x0, y0, x1, y1] rows (or one list of rows per image), got depth {d}")
    if len(per) != batch:
        raise ValueError(f"{len(per)} per-image box lists for a batch of {batch}")
    return per


def box_importance(pos_boxes=None, neg_boxes=None, alpha: float = 0.2, batch: int = 1, image_size: int = 224,
                   grid: tuple[int, int] = (14, 14), device=None) -> torch.Tensor:
    """Importance map A (B, 1, h, w) from pixel boxes on the model input (see the module docstring)."""
    if not 0.0 <= float(alpha) <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    h, w = grid
    pos, neg = _per_image_boxes(pos_boxes, batch), _per_image_boxes(neg_boxes, batch)
    a = torch.ones(batch, 1, h, w, device=device)

    def cells(box):
        x0, y0, x1, y1 = (float(v) for v in box)
        if not (0 <= x0 < x1 <= image_size and 0 <= y0 < y1 <= image_size):
            raise ValueError(f"box {[x0, y0, x1, y1]} is not a non-empty [x0, y0, x1, y1] inside the "
                             f"{image_size}x{image_size} model input")
        c0, c1 = math.floor(x0 * w / image_size + 1e-9), math.ceil(x1 * w / image_size - 1e-9)
        r0, r1 = math.floor(y0 * h / image_size + 1e-9), math.ceil(y1 * h / image_size - 1e-9)
        return slice(r0, r1), slice(c0, c1)

    for i in range(batch):
        pc = [cells(b) for b in pos[i]]
        nc = [cells(b) for b in neg[i]]
        if pc:
            a[i] = float(alpha)
        for r, c in pc:
            a[i, 0, r, c] = 1.0
        for r, c in nc:
            a[i, 0, r, c] = 0.0
    return a


class CSRModel(nn.Module):
    """CSR on CLIP patch features; see the module docstring for the equations and conventions."""

    def __init__(self, clip_model, concepts: Sequence[str], classes: Sequence[str], text_anchors: torch.Tensor,
                 n_prototypes: int = 4, proj_hidden: int = 256, lam: float = 10.0, gamma: float = 5.0,
                 delta: float = 0.1, margin_sign: float = 1.0, text_reg: float = 0.1, cam_pool: str = "max",
                 alpha: float = 0.2, finetune_backbone: bool = False, post_ln: bool = True,
                 proto_init_noise: float = 0.5, head_init: str = "text", detach_stages: bool = True,
                 descriptions: Sequence[str | None] | None = None, box_recentre: bool = True,
                 region_weight: float = 1.0, region_temperature: float = 0.1, region_mode: str = "prototype",
                 input_size: int | None = None, tuned_blocks: int | None = None):
        super().__init__()
        if cam_pool not in ("max", "avg"):
            raise ValueError(f"cam_pool must be 'max' or 'avg', got {cam_pool!r}")
        if margin_sign not in (1, -1, 1.0, -1.0):
            raise ValueError(f"margin_sign must be +1 (subtract δ, SoftTriple) or -1 (add δ), got {margin_sign}")
        if region_mode not in ("prototype", "concept"):
            raise ValueError(f"region_mode must be 'prototype' or 'concept', got {region_mode!r}")
        if head_init not in ("text", "random"):
            raise ValueError(f"head_init must be 'text' or 'random', got {head_init!r}")
        object.__setattr__(self, "_clip", clip_model)  # the shared CLIP: not a submodule, not saved
        vm, vc = clip_model.vision_model, clip_model.config.vision_config
        object.__setattr__(self, "backbone", vm)  # frozen; `own_backbone` swaps in a trainable copy
        self.concepts, self.classes = list(concepts), list(classes)
        self.descriptions = list(descriptions or [None] * len(self.concepts))
        K, D = len(self.concepts), vc.hidden_size
        E = clip_model.visual_projection.out_features
        self.image_size = int(input_size or vc.image_size)
        if self.image_size % vc.patch_size or self.image_size < vc.patch_size:
            raise ValueError(f"input_size must be a multiple of the patch size {vc.patch_size}, got {input_size}")
        g = self.image_size // vc.patch_size
        self.grid = (g, g)
        if tuned_blocks is not None and not 1 <= int(tuned_blocks) <= vc.num_hidden_layers:
            raise ValueError(f"tuned_blocks must be in 1..{vc.num_hidden_layers} (the vision tower's blocks) "
                             f"or None (all), got {tuned_blocks}")
        self.config = dict(n_prototypes=n_prototypes, proj_hidden=proj_hidden, lam=lam, gamma=gamma, delta=delta,
                           margin_sign=float(margin_sign), text_reg=text_reg, cam_pool=cam_pool, alpha=alpha,
                           finetune_backbone=False, post_ln=post_ln, proto_init_noise=proto_init_noise,
                           head_init=head_init, detach_stages=detach_stages, box_recentre=bool(box_recentre),
                           region_weight=float(region_weight), region_temperature=float(region_temperature),
                           region_mode=region_mode, input_size=self.image_size,
                           tuned_blocks=None if tuned_blocks is None else int(tuned_blocks))
        anchors = F.normalize(torch.as_tensor(text_anchors, dtype=torch.float32).reshape(K, E), dim=-1)
        self.register_buffer("text_anchors", anchors.clone())
        # projector: CLIP's visual projection (trainable copy) + a zero-initialised MLP residual
        self.proj_lin = nn.Linear(D, E, bias=False)
        with torch.no_grad():
            self.proj_lin.weight.copy_(clip_model.visual_projection.weight)
        self.proj_mlp = nn.Sequential(nn.Linear(D, proj_hidden), nn.GELU(), nn.Linear(proj_hidden, E))
        nn.init.zeros_(self.proj_mlp[2].weight)
        nn.init.zeros_(self.proj_mlp[2].bias)
        # stage 1 concept head (a 1x1 conv kept as a (K, D) matrix so it resizes simply)
        self.concept_w = nn.Parameter(self._head_rows(anchors))
        self.concept_b = nn.Parameter(torch.zeros(K))
        # stage 3 prototypes: flat (P, E) with their concept and a stable id
        self.prototypes = nn.Parameter(self._proto_rows(anchors, n_prototypes))
        self.register_buffer("proto_concept", torch.arange(K).repeat_interleave(n_prototypes))
        self.register_buffer("proto_ids", torch.arange(K * n_prototypes))
        # stage 4 task head on the P prototype scores
        self.task_w = nn.Parameter(torch.zeros(len(self.classes), K * n_prototypes))
        self.task_b = nn.Parameter(torch.zeros(len(self.classes)))
        nn.init.normal_(self.task_w, std=0.01)
        self.atlas: list[dict] = []
        if finetune_backbone:
            self.own_backbone()
        self.to(next(clip_model.parameters()).device)

    @classmethod
    def from_bundle(cls, bundle, concepts: Sequence[str], classes: Sequence[str],
                    descriptions: Sequence[str | None] | None = None, **cfg) -> "CSRModel":
        """A CSR model on `bundle`'s CLIP with text anchors from its text encoder."""
        anchors = concept_text_embeddings(bundle, concepts, descriptions)
        return cls(bundle.model, concepts, classes, anchors, descriptions=descriptions, **cfg)

    # ------------------------------------------------------------------ helpers
    @property
    def device(self) -> torch.device:
        return self.prototypes.device

    @property
    def n_prototypes(self) -> int:
        return self.prototypes.shape[0]

    def _head_rows(self, anchors: torch.Tensor) -> torch.Tensor:
        if self.config["head_init"] == "text":  # cam_k = <t_k, W_clip f>: CLIP's patch–text similarity
            return (anchors.to(self.proj_lin.weight) @ self.proj_lin.weight).detach().clone()
        return torch.randn(anchors.shape[0], self.proj_lin.in_features, device=anchors.device) * 0.02

    def _proto_rows(self, anchors: torch.Tensor, m: int) -> torch.Tensor:
        rep = anchors.repeat_interleave(m, 0)
        noise = torch.randn_like(rep) / math.sqrt(rep.shape[1])
        return F.normalize(rep + self.config["proto_init_noise"] * noise, dim=-1)

    def _membership(self) -> torch.Tensor:
        """(K, P) bool: prototype p belongs to concept k."""
        return self.proto_concept[None, :] == torch.arange(len(self.concepts), device=self.device)[:, None]

    def concept_index(self, names) -> list[int]:
        """Concept names (or indices) -> indices; unknown names raise ValueError."""
        out, bad = [], []
        for n in names or []:
            if isinstance(n, int) and not isinstance(n, bool) and 0 <= n < len(self.concepts):
                out.append(n)
            elif isinstance(n, str) and n in self.concepts:
                out.append(self.concepts.index(n))
            else:
                bad.append(n)
        if bad:
            raise ValueError(f"unknown concepts {bad}; known: {self.concepts}")
        return out

    def own_backbone(self) -> None:
        """Give a frozen-backbone model its own trainable copy of the CLIP vision tower (saved with it from
        now on, `finetune_backbone`); a model that has one keeps it. With `tuned_blocks` k only the last k
        blocks and the post-LN of the copy train; the rest (the *trunk*) stays the CLIP's, frozen."""
        self.config["finetune_backbone"] = True
        if "backbone" in self._modules:  # already its own (not the shared CLIP's tower, a plain attribute)
            return
        self.backbone = copy.deepcopy(self._clip.vision_model).to(self.device)
        if self.config["tuned_blocks"]:  # else the whole copy trains, the embeddings too
            for mod in (self.backbone.embeddings, self.backbone.pre_layrnorm,
                        *self.backbone.encoder.layers[:self.trunk_blocks]):
                mod.requires_grad_(False)

    @property
    def trunk_blocks(self) -> int:
        """The vision blocks that never train: all of them when frozen, those before `tuned_blocks` else."""
        n = len(self.backbone.encoder.layers)
        if not self.config["finetune_backbone"]:
            return n
        return n - (self.config["tuned_blocks"] or n)

    def trunk(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(B, 3, S', S') normalised pixels -> hidden states (B, 1 + h*w, D) after the untrained blocks
        (`trunk_blocks`), without gradients: what a partly fine-tuned model caches per image."""
        if tuple(pixel_values.shape[-2:]) != (self.image_size,) * 2:
            pixel_values = F.interpolate(pixel_values, size=(self.image_size,) * 2, mode="bilinear", align_corners=False)
        with torch.no_grad():
            return vision_trunk(self.backbone, pixel_values, self.trunk_blocks)

    def features_from_trunk(self, hidden: torch.Tensor) -> torch.Tensor:
        """`trunk` output -> (B, D, h, w) features through the trained blocks (with gradients when tuned)."""
        return features_from_hidden(self.backbone, hidden.to(self.device), self.trunk_blocks, self.config["post_ln"])

    # ------------------------------------------------------------------ features and stage 1
    def features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(B, 3, S', S') normalised pixels -> (B, D, h, w) at the model input S (resized when S' differs);
        frozen backbones run without gradients."""
        post_ln = self.config["post_ln"]
        if self.config["tuned_blocks"] and self.config["finetune_backbone"]:
            return self.features_from_trunk(self.trunk(pixel_values))
        if tuple(pixel_values.shape[-2:]) != (self.image_size,) * 2:
            pixel_values = F.interpolate(pixel_values, size=(self.image_size,) * 2, mode="bilinear", align_corners=False)
        if self.config["finetune_backbone"]:
            return patch_features(self.backbone, pixel_values, post_ln)
        with torch.no_grad():
            return patch_features(self.backbone, pixel_values, post_ln)

    def cams(self, feats: torch.Tensor) -> torch.Tensor:
        """Stage 1: (B, D, h, w) -> concept activation maps (B, K, h, w), `cam_k = w_k · f + b_k`."""
        return torch.einsum("bdhw,kd->bkhw", feats, self.concept_w) + self.concept_b.view(1, -1, 1, 1)

    def pool_cams(self, cams: torch.Tensor) -> torch.Tensor:
        """(B, K, h, w) -> concept logits (B, K) by max or average pooling."""
        return cams.flatten(2).amax(-1) if self.config["cam_pool"] == "max" else cams.flatten(2).mean(-1)

    # ------------------------------------------------------------------ stage 2
    def region_weights(self, region_masks: torch.Tensor) -> torch.Tensor:
        """(B, K, H, W) drawn masks (pixels of the model input, or the patch grid) -> patch coverage (B, K, h, w)."""
        m = torch.nan_to_num(region_masks.float().to(self.device), nan=0.0).clamp(0, 1)
        return m if tuple(m.shape[-2:]) == self.grid else F.adaptive_avg_pool2d(m, self.grid)

    def cam_weights(self, cams: torch.Tensor, region_masks=None) -> tuple[torch.Tensor, torch.Tensor]:
        """Weights (B, K, h, w) summing to 1 per map, and (B, K) bool "from a drawn region".

        `softmax_hw(cam_k)`, except where a concept has a non-empty drawn region: there its normalised
        patch coverage (an all-zero or NaN mask means "none drawn").
        """
        b, k, h, w = cams.shape
        wts = cams.flatten(2).softmax(-1).view(b, k, h, w)
        drawn = torch.zeros(b, k, dtype=torch.bool, device=cams.device)
        if region_masks is not None:
            cov = self.region_weights(region_masks)
            mass = cov.flatten(2).sum(-1)
            drawn = mass > 0
            cov = cov / mass.clamp_min(1e-12)[..., None, None]
            wts = torch.where(drawn[..., None, None], cov, wts)
        return wts, drawn

    def concept_vectors(self, feats: torch.Tensor, cams: torch.Tensor,
                        region_masks=None) -> tuple[torch.Tensor, torch.Tensor]:
        """Stage 2: `v_k = Σ_hw weight_k(h,w) · f(h,w)` -> (B, K, D), and the (B, K) drawn flags."""
        wts, drawn = self.cam_weights(cams, region_masks)
        return torch.einsum("bkhw,bdhw->bkd", wts, feats), drawn

    # ------------------------------------------------------------------ stage 3
    def project(self, x: torch.Tensor) -> torch.Tensor:
        """Projector P on (..., D) features -> L2-normalised (..., E)."""
        return F.normalize(self.proj_lin(x) + self.proj_mlp(x), dim=-1)

    def concept_similarity(self, vp: torch.Tensor) -> torch.Tensor:
        """(N, E) projected vectors -> (N, K) `sim_k = Σ_m softmax_m(γ<p_km, v'>) <p_km, v'>` (-inf: no prototypes)."""
        dots = vp @ F.normalize(self.prototypes, dim=-1).T  # (N, P)
        mem = self._membership()  # (K, P)
        logit = (self.config["gamma"] * dots)[:, None, :].masked_fill(~mem[None], -1e4)  # finite: no NaN
        q = logit.softmax(-1) * mem[None]  # q_m over each concept's own prototypes (0 for an empty concept)
        sim = (q * dots[:, None, :]).sum(-1)
        return sim.masked_fill(~mem.any(1)[None], float("-inf"))

    def contrastive_loss(self, vp: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Multi-prototype loss `-log e^{λ(sim_y − sδ)} / (e^{λ(sim_y − sδ)} + Σ_{k≠y} e^{λ sim_k})`."""
        c = self.config
        sim = self.concept_similarity(vp)
        logits = c["lam"] * sim
        logits = logits - c["lam"] * c["margin_sign"] * c["delta"] * F.one_hot(target, sim.shape[1]).to(sim)
        return F.cross_entropy(logits, target)

    def text_anchor_loss(self) -> torch.Tensor:
        """`mean_km (1 − cos(p_km, t_k))`: prototypes stay near their concept's text embedding."""
        p = F.normalize(self.prototypes, dim=-1)
        return (1 - (p * self.text_anchors[self.proto_concept]).sum(-1)).mean()

    # ------------------------------------------------------------------ stage 4
    def similarity_maps(self, feats: torch.Tensor) -> torch.Tensor:
        """(B, D, h, w) -> `S_km(h,w) = cos(p_km, P(f(h,w)))`, (B, P, h, w)."""
        z = self.project(feats.permute(0, 2, 3, 1))  # (B, h, w, E)
        return torch.einsum("bhwe,pe->bphw", z, F.normalize(self.prototypes, dim=-1))

    def importance_map(self, pos_boxes=None, neg_boxes=None, alpha: float | None = None, batch: int = 1) -> torch.Tensor:
        """A (B, 1, h, w) from pixel boxes on the model input (`box_importance`)."""
        alpha = self.config["alpha"] if alpha is None else alpha
        return box_importance(pos_boxes, neg_boxes, alpha, batch, self.image_size, self.grid, self.device)

    @staticmethod
    def evidence_maps(sim_maps: torch.Tensor, importance: torch.Tensor | None = None) -> torch.Tensor:
        """`A ⊙ (S_km + 1) − 1` (B, P, h, w): A weights the cosine shifted to [0, 2], so A = 0 means
        "no evidence" (cosine −1). Weighting the raw cosine, as written in the paper, would raise
        negative similarities towards 0 outside the focus (most of a map is negative). Scores, evidence
        boxes and evidence regions all read this map."""
        return sim_maps if importance is None else (sim_maps + 1) * importance - 1

    @classmethod
    def scores_from_maps(cls, sim_maps: torch.Tensor, importance: torch.Tensor | None = None) -> torch.Tensor:
        """`s_km = max_hw (A ⊙ (S_km + 1)) − 1` -> (B, P), the maxima of `evidence_maps`."""
        return cls.evidence_maps(sim_maps, importance).flatten(2).amax(-1)

    def concept_scores(self, proto_scores: torch.Tensor) -> torch.Tensor:
        """(B, P) -> (B, K): each concept's best prototype (0 for a concept without prototypes)."""
        mem = self._membership()
        s = proto_scores[:, None, :].masked_fill(~mem[None], float("-inf")).amax(-1)
        return s.masked_fill(~mem.any(1)[None], 0.0)

    def reject_mask(self, reject_concepts=None) -> torch.Tensor:
        """(P,) float: 0 for prototypes of rejected concepts, 1 otherwise."""
        rej = torch.tensor(self.concept_index(reject_concepts), dtype=torch.long, device=self.device)
        return (~torch.isin(self.proto_concept, rej)).float()

    def classify(self, proto_scores: torch.Tensor, reject_concepts=None) -> torch.Tensor:
        """Task head on the (B, P) prototype scores, rejected concepts zeroed -> class logits (B, C)."""
        return (proto_scores * self.reject_mask(reject_concepts)) @ self.task_w.T + self.task_b

    def forward(self, pixel_values: torch.Tensor | None = None, features: torch.Tensor | None = None,
                pos_boxes=None, neg_boxes=None, alpha: float | None = None, reject_concepts=None) -> dict:
        """Inference. Pass `pixel_values` (B, 3, S, S) or cached `features` (B, D, h, w).

        Returns cams, concept_logits (stage 1), sim_maps (B, P, h, w; before A), importance (B, 1, h, w),
        proto_scores (B, P) and concept_scores (B, K) (after A and rejection), keep (P,) (0 for the prototypes
        of rejected concepts), and logits (B, C).
        """
        feats = self.features(pixel_values) if features is None else features.to(self.device)
        b = feats.shape[0]
        cams = self.cams(feats)
        maps = self.similarity_maps(feats)
        imp = self.importance_map(pos_boxes, neg_boxes, alpha, b)
        keep = self.reject_mask(reject_concepts)
        scores = self.scores_from_maps(maps, imp)
        head_in = scores
        dims = float(self.config["alpha"] if alpha is None else alpha) < 1  # α < 1 dims what lies outside a focus
        if self.config["box_recentre"] and pos_boxes is not None and dims:  # only a positive focus lowers every map
            focus = torch.tensor([len(t) > 0 for t in _per_image_boxes(pos_boxes, b)], device=self.device)
            head_in = scores + self.box_shift(self.scores_from_maps(maps), scores, keep) * focus[:, None]
        return {"cams": cams, "concept_logits": self.pool_cams(cams), "sim_maps": maps, "importance": imp,
                "proto_scores": scores * keep, "concept_scores": self.concept_scores(scores * keep),
                "head_scores": head_in * keep, "keep": keep, "logits": (head_in * keep) @ self.task_w.T + self.task_b}

    @staticmethod
    def box_shift(unboxed: torch.Tensor, boxed: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        """(B, 1): the mean drop of the kept prototypes' scores under the boxes, added back before the head.

        A focus restricts every max, so every score falls; the linear head, fitted on unboxed scores, would
        read that uniform fall as a shift of each class logit by it times the class's summed weights (a
        bias against classes with many positive weights, not evidence). Recentring keeps what the boxes
        change relative to the other prototypes: which evidence lies in the focus. Only images with a
        positive box are recentred: negative boxes alone leave A = 1 outside them, so what falls is the
        evidence they exclude, and the head reads it as it is."""
        w = keep.expand_as(boxed)
        return (((unboxed - boxed) * w).sum(1, keepdim=True) / w.sum(1, keepdim=True).clamp_min(1))

    # ------------------------------------------------------------------ training
    def losses(self, concept_labels: torch.Tensor, class_labels: torch.Tensor | None = None,
               pixel_values: torch.Tensor | None = None, features: torch.Tensor | None = None,
               region_masks: torch.Tensor | None = None) -> dict:
        """All four stages' losses on one batch; `total` = bce + contrastive + text_reg·text + task
        + region_weight·region (the drawn regions' patch supervision).

        concept_labels (B, K) in {0, 1}; class_labels (B,) long (optional); region_masks (B, K, H, W)
        drawn regions (optional; a drawn concept counts as present). With `detach_stages` (default)
        each stage trains only its own parts, as in the paper's staged training.
        """
        feats = self.features(pixel_values) if features is None else features.to(self.device)
        det = self.config["detach_stages"]
        y = concept_labels.to(self.device).float()
        cams = self.cams(feats)
        out = {"bce": F.binary_cross_entropy_with_logits(self.pool_cams(cams), y)}
        v, drawn = self.concept_vectors(feats, cams.detach() if det else cams, region_masks)
        pos = (y > 0.5) | drawn
        bi, ki = pos.nonzero(as_tuple=True)
        has_proto = self._membership().any(1)[ki]
        bi, ki = bi[has_proto], ki[has_proto]
        out["contrastive"] = (self.contrastive_loss(self.project(v[bi, ki]), ki) if len(ki)
                              else feats.new_zeros(()))
        out["text"] = self.text_anchor_loss()
        out["region"] = feats.new_zeros(())
        if self.config["region_weight"] > 0 and region_masks is not None and drawn.any():
            out["region"] = self.region_loss(feats, region_masks, drawn, v)
        if class_labels is not None:
            s = self.scores_from_maps(self.similarity_maps(feats))
            out["task"] = F.cross_entropy(self.classify(s.detach() if det else s), class_labels.to(self.device))
        else:
            out["task"] = feats.new_zeros(())
        out["total"] = (out["bce"] + out["contrastive"] + self.config["text_reg"] * out["text"] + out["task"]
                        + self.config["region_weight"] * out["region"])
        return out

    def region_loss(self, feats: torch.Tensor, region_masks: torch.Tensor, drawn: torch.Tensor,
                    v: torch.Tensor) -> torch.Tensor:
        """Drawn regions as patch-level supervision of the similarity maps: `-log Σ_{hw ∈ R} softmax_hw(S/τ)`,
        the map's softmax mass on the patches the region touches."""
        inside = self.region_weights(region_masks).flatten(2) > 0  # (B, K, hw)
        bi, ki = drawn.nonzero(as_tuple=True)
        mem = self._membership()[ki]  # (n, P)
        keep = mem.any(1)
        bi, ki, mem = bi[keep], ki[keep], mem[keep]
        if not len(ki):
            return feats.new_zeros(())
        maps = self.similarity_maps(feats[bi]).flatten(2)  # (n, P, hw)
        tau, gam = self.config["region_temperature"], self.config["gamma"]
        ins = inside[bi, ki][:, None, :]  # (n, 1, hw)
        if self.config["region_mode"] == "concept":  # the concept map, soft-assigned over its prototypes per patch
            q = (gam * maps).masked_fill(~mem[..., None], -1e4).softmax(1)
            ck = (q * maps).sum(1, keepdim=True)  # (n, 1, hw)
            lp = (ck / tau).log_softmax(-1)
            return -lp.masked_fill(~ins, -1e4).logsumexp(-1).mean()
        # each prototype of the concept, weighted by its soft assignment to the region's vector (as in stage 3)
        lp = (maps / tau).log_softmax(-1)
        per = -lp.masked_fill(~ins, -1e4).logsumexp(-1)  # (n, P)
        dots = self.project(v[bi, ki]) @ F.normalize(self.prototypes, dim=-1).T  # (n, P)
        q = (gam * dots).masked_fill(~mem, -1e4).softmax(-1).detach()
        return (q * per).sum(-1).mean()

    # ------------------------------------------------------------------ text-grounded concepts
    @torch.no_grad()
    def add_concept(self, name: str, anchor: torch.Tensor, n_prototypes: int | None = None,
                    description: str | None = None) -> list[int]:
        """Add a concept from its (E,) text anchor: head row, M prototypes at the anchor, zero task columns.

        Predictions are unchanged until the head is trained (its new columns are zero). Returns the new
        prototype ids.
        """
        if name in self.concepts:
            raise ValueError(f"concept {name!r} exists")
        m = n_prototypes or self.config["n_prototypes"]
        a = F.normalize(torch.as_tensor(anchor, dtype=torch.float32, device=self.device).reshape(1, -1), dim=-1)
        k = len(self.concepts)
        self.concepts.append(name)
        self.descriptions.append(description)
        self.text_anchors = torch.cat([self.text_anchors, a])
        self.concept_w = nn.Parameter(torch.cat([self.concept_w, self._head_rows(a)]))
        self.concept_b = nn.Parameter(torch.cat([self.concept_b, self.concept_b.new_zeros(1)]))
        start = int(self.proto_ids.max()) + 1 if len(self.proto_ids) else 0
        ids = torch.arange(start, start + m, device=self.device)
        self.prototypes = nn.Parameter(torch.cat([self.prototypes, self._proto_rows(a, m)]))
        self.proto_concept = torch.cat([self.proto_concept, torch.full((m,), k, device=self.device)])
        self.proto_ids = torch.cat([self.proto_ids, ids])
        self.task_w = nn.Parameter(torch.cat([self.task_w, self.task_w.new_zeros(len(self.classes), m)], 1))
        return ids.tolist()

    def add_concept_by_text(self, bundle, name: str, description: str | None = None, **kw) -> list[int]:
        """Add a concept named in words: its anchor comes from `bundle`'s text encoder."""
        anchor = concept_text_embeddings(bundle, [name], [description])[0]
        return self.add_concept(name, anchor, description=description, **kw)

    # ------------------------------------------------------------------ atlas, pruning, refit
    @torch.no_grad()
    def build_atlas(self, items: Iterable, store: bool = True, features: bool = False) -> list[dict]:
        """Tie each prototype to its nearest training patch.

        `items` yields (image_id, pixel_values) with pixel_values (3, S, S), or (B, 3, S, S) with a
        sequence of B ids; with `features`, cached patch features (B, D, h, w) instead of pixels. An item
        may carry a third element, the images' concept labels (B, K) in this model's concept order: a
        prototype is then tied to the images labelled with its concept (CSR's local concept vectors come
        from those images), falling back to all images only when no image has its concept.
        Returns one entry per prototype (current order): prototype_id, concept, image_id, patch
        [row, col], box [x0, y0, x1, y1] (pixels of the model input, half-open), similarity, and
        concept_labelled (whether that image is labelled with the concept; None without labels).
        """
        p = self.n_prototypes
        pc = self.proto_concept.long().cpu()
        best = {True: torch.full((p,), float("-inf")), False: torch.full((p,), float("-inf"))}  # labelled / any
        where: dict = {True: [None] * p, False: [None] * p}
        any_labels = False
        h, w = self.grid
        for image_id, pv, *lab in items:
            pv = pv[None] if pv.ndim == 3 else pv
            single = isinstance(image_id, (str, int)) or image_id is None
            ids = [image_id] if pv.shape[0] == 1 and single else list(image_id)
            f = pv.to(self.device) if features else self.features(pv.to(self.device))
            maps = self.similarity_maps(f).flatten(2).float().cpu()  # (B, P, hw)
            val, idx = maps.max(-1)  # (B, P)
            vals = {False: val}
            if lab and lab[0] is not None:  # only the images with the prototype's concept
                any_labels = True
                has = torch.as_tensor(lab[0]).reshape(len(ids), -1)[:, pc] > 0  # (B, P)
                vals[True] = val.masked_fill(~has, float("-inf"))
            for kind, v in vals.items():
                top, b = v.max(0)  # (P,): each prototype's best image in this batch (the first on ties)
                better = top > best[kind]
                best[kind] = torch.where(better, top, best[kind])
                for j in better.nonzero().flatten().tolist():
                    where[kind][j] = (ids[int(b[j])], int(idx[b[j], j]))
        atlas = []
        for j in range(p):
            kind = where[True][j] is not None
            if where[kind][j] is None:
                continue
            img, flat = where[kind][j]
            r, c = divmod(flat, w)
            box = [round(c * self.image_size / w), round(r * self.image_size / h),
                   round((c + 1) * self.image_size / w), round((r + 1) * self.image_size / h)]
            atlas.append({"prototype_id": int(self.proto_ids[j]), "concept": self.concepts[int(pc[j])],
                          "image_id": img, "patch": [r, c], "box": box, "similarity": float(best[kind][j]),
                          "concept_labelled": kind if any_labels else None})
        if store:
            self.atlas = atlas
        return atlas

    @staticmethod
    def firing_rates_from_maps(sim_maps: torch.Tensor, region_cells: torch.Tensor) -> torch.Tensor:
        """(N, P, h, w) similarity maps, (N, h, w) bool patch cells of a region per image -> (P,) share of the
        images whose map peaks on a cell of their region."""
        n, p, h, w = sim_maps.shape
        if n == 0:
            return torch.zeros(p)
        peak = sim_maps.flatten(2).argmax(-1)  # (N, P)
        return region_cells.reshape(n, h * w).to(sim_maps.device).gather(1, peak).float().mean(0).cpu()

    def region_cells(self, masks) -> torch.Tensor:
        """Masks (each (H, W), any size, resized to the model input) -> (N, h, w) bool: the patch cells
        each mask touches."""
        cells = [F.adaptive_max_pool2d(F.interpolate(torch.as_tensor(np.asarray(m, np.float32))[None, None],
                                                     size=(self.image_size,) * 2, mode="nearest"), self.grid)[0, 0] > 0
                 for m in masks]
        return torch.stack(cells) if cells else torch.zeros(0, *self.grid, dtype=torch.bool)

    @torch.no_grad()
    def firing_rates(self, feats: torch.Tensor, masks) -> torch.Tensor:
        """(P,) share of the images (cached features (N, D, h, w), one region mask each) on whose region
        each prototype's similarity map peaks: where a prototype fires, e.g. on a ruler or a text marker."""
        return self.firing_rates_from_maps(self.similarity_maps(feats.to(self.device)), self.region_cells(masks))

    def prototypes_firing_on(self, feats: torch.Tensor, masks, share: float = 0.5) -> list[int]:
        """Ids of the prototypes that peak on the region in more than `share` of the images (firing-map pruning)."""
        if not 0.0 <= float(share) < 1.0:
            raise ValueError(f"share must be in [0, 1), got {share}")
        rates = self.firing_rates(feats, masks)
        return sorted(int(i) for i, r in zip(self.proto_ids.tolist(), rates.tolist()) if r > share)

    @torch.no_grad()
    def prune_prototypes(self, ids: Iterable[int]) -> torch.Tensor:
        """Remove prototypes by id (task-head columns and atlas entries too); returns the kept column index.

        Slice stored (N, P) scores with the returned index before `refit_task_head`.
        """
        ids = [int(i) for i in ids]
        known = set(self.proto_ids.tolist())
        bad = [i for i in ids if i not in known]
        if bad:
            raise ValueError(f"unknown prototype ids {bad}; the model has {len(known)} prototypes")
        keep = (~torch.isin(self.proto_ids, torch.tensor(ids, device=self.device))).nonzero().flatten()
        self.prototypes = nn.Parameter(self.prototypes[keep].clone())
        self.proto_concept = self.proto_concept[keep].clone()
        self.proto_ids = self.proto_ids[keep].clone()
        self.task_w = nn.Parameter(self.task_w[:, keep].clone())
        self.atlas = [e for e in self.atlas if e["prototype_id"] not in set(ids)]
        return keep

    def refit_task_head(self, scores: torch.Tensor, labels: torch.Tensor, method: str = "logreg",
                        steps: int = 100, l2: float = 1e-4) -> float:
        """Refit the task head on stored (N, P) prototype scores; returns the training accuracy.

        `lstsq`: ridge regression on one-hot targets; `logreg`: multinomial logistic regression
        (L-BFGS, `steps` iterations, from the current weights).
        """
        x = torch.as_tensor(scores, dtype=torch.float32, device=self.device).detach()
        y = torch.as_tensor(labels, dtype=torch.long, device=self.device)
        if x.shape[1] != self.n_prototypes:
            raise ValueError(f"scores have {x.shape[1]} columns, the model {self.n_prototypes} prototypes")
        c = len(self.classes)
        if method == "lstsq":
            xa = torch.cat([x, torch.ones(len(x), 1, device=x.device)], 1)
            t = F.one_hot(y, c).float()
            reg = l2 * torch.eye(xa.shape[1], device=x.device)
            reg[-1, -1] = 0
            sol = torch.linalg.solve(xa.T @ xa + reg, xa.T @ t)  # (P + 1, C)
            with torch.no_grad():
                self.task_w.copy_(sol[:-1].T)
                self.task_b.copy_(sol[-1])
        elif method == "logreg":
            w = self.task_w.detach().clone().requires_grad_(True)
            b = self.task_b.detach().clone().requires_grad_(True)
            opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=steps, line_search_fn="strong_wolfe")

            def closure():
                opt.zero_grad()
                loss = F.cross_entropy(x @ w.T + b, y) + l2 * w.pow(2).sum()
                loss.backward()
                return loss

            with torch.enable_grad():
                opt.step(closure)
            with torch.no_grad():
                self.task_w.copy_(w)
                self.task_b.copy_(b)
        else:
            raise ValueError(f"method must be 'logreg' or 'lstsq', got {method!r}")
        with torch.no_grad():
            return float(((x @ self.task_w.T + self.task_b).argmax(1) == y).float().mean())

    # ------------------------------------------------------------------ checkpoint
    def clip_fingerprint(self) -> str:
        """Hash of the backbone weights (same as `RegionCLIP.clip_fingerprint`)."""
        return RegionCLIP.clip_fingerprint(self)

    def full_config(self) -> dict:
        return {**self.config, "concepts": self.concepts, "classes": self.classes, "descriptions": self.descriptions}

    def save(self, path, extra: dict | None = None) -> Path:
        """Publish atomically to `path` (.safetensors; config and atlas in its metadata) and a JSON summary."""
        meta = {"format": FORMAT, "config": json.dumps(self.full_config()), "atlas": json.dumps(self.atlas),
                "clip_fingerprint": self.clip_fingerprint()}
        info = {"format": FORMAT, "config": self.full_config(), "clip_fingerprint": meta["clip_fingerprint"],
                "n_prototypes": self.n_prototypes, "atlas": self.atlas, **(extra or {})}
        return checkpoint.publish(path, self.state_dict(), meta, info)

    @classmethod
    def load(cls, bundle, path=None, device=None) -> "CSRModel":
        """A CSR model from `path` (default: `csr.safetensors` in the CLIP directory) on `bundle`'s CLIP."""
        path = Path(path) if path is not None else csr_path(bundle.path)
        meta, state = checkpoint.read(path, FORMAT, "CSR model", "train one with the `concepts` train task")
        cfg = json.loads(meta["config"])
        concepts, classes, desc = cfg.pop("concepts"), cfg.pop("classes"), cfg.pop("descriptions")
        model = cls(bundle.model, concepts, classes, state["text_anchors"], descriptions=desc, **cfg)
        if meta.get("clip_fingerprint") != model.clip_fingerprint():
            warnings.warn(f"{path} was trained on a different CLIP backbone than {bundle.path}; retrain it")
        # prototype count may differ from K·M after pruning or added concepts
        for name in ("prototypes", "task_w"):
            setattr(model, name, nn.Parameter(torch.empty_like(state[name], device=model.device)))
        for name in ("proto_concept", "proto_ids"):
            setattr(model, name, torch.empty_like(state[name], device=model.device))
        model.load_state_dict(state, strict=True)
        model.atlas = json.loads(meta.get("atlas", "[]"))
        return model.to(device or bundle.device).eval()
