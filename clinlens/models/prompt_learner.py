"""ClinCoCoOp: concept-weighted prompt learning on a frozen CLIP (methods.md §3).

A plain `torch.nn.Module` on a `ClipBundle`'s Hugging Face `CLIPModel`; nothing here knows MONAI
Label. Only the prompt parts are trained and saved; both CLIP towers stay frozen and shared.

- **CoOp (§3 "Base").** Prompt `[SOS][V]_1..[V]_M [CLASS].[EOS]`: M learnable context vectors
  replace token embeddings after [SOS]. The sequence (+ CLIP's position embeddings) runs through the
  frozen text encoder with the causal mask, the final LN, pooling at the [EOS] position (found with
  the *tokenizer's* EOS id, never an argmax over ids: the pooling trap of offline_models.md) and
  `text_projection`: `g(p_c)`. Context starts as the token embeddings of `ctx_init` ("a photo of a").
- **CoCoOp (§3 "CoCoOp addition").** A meta-net `Linear(E→E/16), ReLU, Linear(→d)` maps the image
  feature `f` to a bias `π(f)` added to every context vector: `p_c(f) = [v_m + π(f)]_m, c`. Its output
  layer starts at zero, so at initialisation the prompt is exactly the hand prompt `ctx_init c.`.
- **Concept weights (§3 "Concept weights").** `α_cj = softmax_j(cos(f, t_j)/τ)` over the concepts j of
  class c (all concepts unless `class_concepts` maps classes to concept lists), with `t_j` the frozen
  text anchors of `csr.concept_text_embeddings`. Anchor `ĝ_c = normalize(Σ_j α_cj t_j)`; the loss
  `L_align = mean_b (1 − cos(g(p_y(f_b)), ĝ_y))` pulls the soft prompt of the image's class y to it.
  α (B, K) is returned as the per-image concept explanation (for the label class, else the predicted).
  A class without findings ('normal': `class_concepts_from_labels` gives it no concept) has α = 0 and
  no alignment term; before, it was aligned to an arbitrary finding, which cost chest and CT accuracy.
- **Global–local (§3 "Local term").** Patch tokens `z_i = W_vis · postLN(h_i)` (CLIP's own
  projection, MaskCLIP-style) plus a learnable positional encoding `P_i` in the joint space (zero at
  init): `ẑ_i = normalize(z_i + P_i)`. Significance `β_ci = softmax_i(cos(ẑ_i, g(p_c))/τ_l)` (text-
  conditioned: patches that match the class prompt matter most), `local_c = Σ_i β_ci cos(ẑ_i, g(p_c))`.
  `logit_c = s · (cos(f, g(p_c)) + λ · local_c)`, s = CLIP's logit scale; λ = `local_weight`
  (0.01, XCoOp's local scale). The local branch also gets its own cross-entropy
  `L_local = CE(s · local, y)` (weight `local_loss_weight`, default 0; beyond the paper): the local
  branch's own cross-entropy. Off by default: on validation phantoms (benchmarks/results/
  prompt_learning_validation.md) dropping it moved ClinCoCoOp's mean paired gap to CoOp from −0.027 to
  −0.012 (derm, chest, CT at 4 and 16 shots).
- **Loss.** `L = CE(logits, y) + align_weight · L_align + local_loss_weight · L_local`.

Checkpoint: one safetensors file holding only the learnable tensors (context, meta-net, positional
encoding), classes/concepts/config in its metadata, published atomically, plus a JSON summary.
"""
from __future__ import annotations

import hashlib
import inspect
import json
import warnings
from pathlib import Path
from typing import Mapping, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from clinlens.models.csr import concept_text_embeddings
from clinlens.models import checkpoint

PROMPT_FILE = "prompt_learner.safetensors"
FORMAT = "clinlens.prompt_learner/1"


def prompt_learner_path(clip_dir) -> Path:
    """Where the prompt learner of a CLIP directory lives by default."""
    return Path(clip_dir) / PROMPT_FILE


def _text_tower(clip_model):
    tm = clip_model.text_model
    return getattr(tm, "text_model", tm)  # transformers 4.x nests a CLIPTextTransformer


def _causal_encoder(encoder, x: torch.Tensor, config) -> torch.Tensor:
    """Run a CLIP text encoder on embeddings `x` (B, L, d) with the causal mask, as CLIPTextModel does."""
    params = {k: v.detach() for k, v in encoder.named_parameters()}  # frozen: no grads into CLIP
    if "causal_attention_mask" in inspect.signature(encoder.forward).parameters:  # transformers 4.x
        from transformers.modeling_attn_mask_utils import _create_4d_causal_attention_mask

        mask = _create_4d_causal_attention_mask(x.shape[:2], x.dtype, x.device)
        kw = dict(inputs_embeds=x, causal_attention_mask=mask)
    else:
        from transformers.masking_utils import create_causal_mask

        mask = create_causal_mask(config=config, inputs_embeds=x, attention_mask=None, past_key_values=None)
        kw = dict(inputs_embeds=x, attention_mask=mask, is_causal=True)
    out = torch.func.functional_call(encoder, params, args=(), kwargs=kw)
    return out[0] if isinstance(out, tuple) else out.last_hidden_state


def class_concepts_from_labels(concept_labels, class_labels, concepts: Sequence[str], classes: Sequence[str],
                               min_rate: float = 0.5) -> dict[str, list[str]]:
    """Concepts present in at least `min_rate` of a class's images (at least its most frequent one). A class
    most of whose images show no concept at all (a 'normal' class) gets none: nothing to align its prompt to."""
    y = torch.as_tensor(concept_labels, dtype=torch.float32)
    c = torch.as_tensor(class_labels).long()
    out = {}
    for i, name in enumerate(classes):
        rows = y[c == i]
        if not len(rows):
            out[name] = list(concepts)
            continue
        if float((rows > 0.5).any(1).float().mean()) < min_rate:
            out[name] = []
            continue
        rate = rows.mean(0)
        keep = [concepts[j] for j in range(len(concepts)) if rate[j] >= min_rate]
        out[name] = keep or [concepts[int(rate.argmax())]]
    return out


class ClinCoCoOp(nn.Module):
    """ClinCoCoOp prompt learner; see the module docstring for the equations (methods.md §3)."""

    def __init__(self, bundle, classes: Sequence[str], concepts: Sequence[str],
                 descriptions: Sequence[str | None] | None = None,
                 class_concepts: Mapping[str, Sequence[str]] | None = None,
                 n_ctx: int = 4, ctx_init: str | None = "a photo of a", conditional: bool = True,
                 meta_hidden: int | None = None, concept_temperature: float = 0.07, align_weight: float = 1.0,
                 local_weight: float = 0.01, local_loss_weight: float = 0.0, local_temperature: float = 0.07,
                 pos_enc: bool = True, anchors: torch.Tensor | None = None):
        super().__init__()
        clip = bundle.model
        object.__setattr__(self, "_clip", clip)  # shared and frozen: not a submodule, not saved
        object.__setattr__(self, "_bundle", bundle)
        self.classes, self.concepts = list(classes), list(concepts)
        if not self.classes or not self.concepts:
            raise ValueError("ClinCoCoOp needs at least one class and one concept")
        self.descriptions = list(descriptions or [None] * len(self.concepts))
        for t, name in ((concept_temperature, "concept_temperature"), (local_temperature, "local_temperature")):
            if not t > 0:
                raise ValueError(f"{name} must be > 0, got {t}")
        tm = _text_tower(clip)
        d = tm.embeddings.token_embedding.embedding_dim
        E = clip.text_projection.out_features
        vc = clip.config.vision_config
        self.grid = (vc.image_size // vc.patch_size,) * 2
        self.class_concepts = self._check_class_concepts(class_concepts)
        self.config = dict(n_ctx=n_ctx, ctx_init=ctx_init, conditional=conditional, meta_hidden=meta_hidden,
                           concept_temperature=concept_temperature, align_weight=align_weight,
                           local_weight=local_weight, local_loss_weight=local_loss_weight,
                           local_temperature=local_temperature, pos_enc=pos_enc)

        # tokenised "[CLASS]." prompts; context goes between [SOS] and the class tokens
        tok = bundle.tokenizer
        self.eos_id = tok.eos_token_id
        ids = tok([f"{c}." for c in self.classes], padding=True, return_tensors="pt")["input_ids"]
        unk = getattr(tok, "unk_token_id", None)
        for c, row in zip(self.classes, ids):
            if unk is not None and (row == unk).any():
                warnings.warn(f"class name {c!r} has words the CLIP tokenizer does not know")
        eos = (ids == self.eos_id).int().argmax(1)
        if not (ids[torch.arange(len(ids)), eos] == self.eos_id).all():
            raise ValueError("the tokenizer adds no end-of-text token; CLIP cannot pool these prompts")
        if ids.shape[1] + n_ctx > clip.config.text_config.max_position_embeddings:
            raise ValueError(f"prompts of {ids.shape[1] + n_ctx} tokens exceed the text encoder's "
                             f"{clip.config.text_config.max_position_embeddings} positions; use a smaller n_ctx")
        # context follows [SOS]; a tokenizer without a start token puts it first
        self.n_prefix = int(tok.bos_token_id is not None and bool((ids[:, 0] == tok.bos_token_id).all()))
        self.register_buffer("prompt_ids", ids, persistent=False)
        self.register_buffer("eos_pos", eos + n_ctx, persistent=False)

        # CoOp context, from ctx_init's token embeddings when it has exactly n_ctx known tokens
        ctx = torch.randn(n_ctx, d) * 0.02
        if ctx_init:
            init = tok(ctx_init, add_special_tokens=False)["input_ids"]
            if len(init) == n_ctx and (unk is None or unk not in init):
                ctx = tm.embeddings.token_embedding.weight[torch.tensor(init)].detach().float().cpu().clone()
            else:
                warnings.warn(f"ctx_init {ctx_init!r} is not {n_ctx} known tokens; random context instead")
        self.ctx = nn.Parameter(ctx)
        # CoCoOp meta-net; zero output layer -> starts as plain CoOp
        h = meta_hidden or max(E // 16, 1)
        self.meta_net = nn.Sequential(nn.Linear(E, h), nn.ReLU(inplace=True), nn.Linear(h, d)) if conditional else None
        if self.meta_net is not None:
            nn.init.zeros_(self.meta_net[2].weight)
            nn.init.zeros_(self.meta_net[2].bias)
        # positional encoding of patch tokens in the joint space, zero at init
        self.pos_embed = nn.Parameter(torch.zeros(self.grid[0] * self.grid[1], E)) if pos_enc else None

        if anchors is None:
            anchors = concept_text_embeddings(bundle, self.concepts, self.descriptions)
        self.register_buffer("anchors", F.normalize(torch.as_tensor(anchors).float(), dim=-1), persistent=False)
        mask = torch.tensor([[k in self.class_concepts[c] for k in self.concepts] for c in self.classes])
        self.register_buffer("concept_mask", mask, persistent=False)
        self.to(bundle.device)

    @classmethod
    def from_bundle(cls, bundle, classes: Sequence[str], concepts: Sequence[str], **cfg) -> "ClinCoCoOp":
        return cls(bundle, classes, concepts, **cfg)

    def _check_class_concepts(self, class_concepts) -> dict[str, list[str]]:
        if class_concepts is None:
            return {c: list(self.concepts) for c in self.classes}
        unknown_cls = sorted(set(class_concepts) - set(self.classes))
        if unknown_cls:
            raise ValueError(f"class_concepts names unknown classes {unknown_cls}; classes are {self.classes}")
        out = {}
        for c in self.classes:
            names = list(class_concepts.get(c, self.concepts))
            bad = sorted(set(names) - set(self.concepts))
            if bad:
                raise ValueError(f"class {c!r}: concepts {bad} are not a subset of {self.concepts} (an empty list "
                                 "marks a class without findings)")
            out[c] = names
        return out

    # ------------------------------------------------------------------ helpers
    @property
    def device(self) -> torch.device:
        return self.ctx.device

    @property
    def logit_scale(self) -> torch.Tensor:
        return self._clip.logit_scale.detach().exp().clamp(max=100).to(self.device)

    def clip_fingerprint(self) -> str:
        """A short hash of the CLIP weights (both towers) the prompt was learned on."""
        tm, vm = _text_tower(self._clip), self._clip.vision_model
        h = hashlib.sha1()
        for t in (tm.embeddings.token_embedding.weight, tm.encoder.layers[-1].mlp.fc2.weight,
                  vm.embeddings.patch_embedding.weight, vm.encoder.layers[-1].mlp.fc2.weight):
            h.update(t.detach().float().cpu().numpy().tobytes())
        return h.hexdigest()[:16]

    def full_config(self) -> dict:
        return {**self.config, "classes": self.classes, "concepts": self.concepts,
                "descriptions": self.descriptions, "class_concepts": self.class_concepts}

    # ------------------------------------------------------------------ image side (frozen)
    @torch.no_grad()
    def encode_image(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, 3, S, S) -> image feature f (B, E), L2-normalised as `ClipBundle.encode_images`, and
        projected patch tokens z (B, N, E) = visual_projection(post-LN tokens) as `csr.patch_features`
        (one ViT pass for both). Cache them and pass to `forward` to train without the vision tower."""
        vm = self._clip.vision_model
        out = vm(pixel_values=pixel_values.to(self._bundle.device))
        f = F.normalize(self._clip.visual_projection(out.pooler_output), dim=-1)
        z = self._clip.visual_projection(vm.post_layernorm(out.last_hidden_state[:, 1:]))
        if z.shape[1] != self.grid[0] * self.grid[1]:
            raise ValueError(f"{z.shape[1]} patch tokens, expected a {self.grid} grid")
        return f.float().to(self.device), z.float().to(self.device)

    # ------------------------------------------------------------------ text side
    def prompt_embeddings(self, ctx: torch.Tensor) -> torch.Tensor:
        """Context (M, d) or per-image (B, M, d) -> token embeddings (B?, C, M+L, d) of `[SOS] ctx [CLASS].[EOS]`."""
        emb = _text_tower(self._clip).embeddings.token_embedding.weight.detach()
        tok = emb[self.prompt_ids.to(emb.device)].to(ctx.device, ctx.dtype)  # (C, L, d)
        C = tok.shape[0]
        lead = ctx.shape[:-2]
        ctx = ctx.unsqueeze(-3).expand(*lead, C, *ctx.shape[-2:])
        tok = tok.expand(*lead, *tok.shape)
        k = self.n_prefix
        return torch.cat([tok[..., :k, :], ctx, tok[..., k:, :]], dim=-2)

    def encode_prompt_embeddings(self, x: torch.Tensor, eos_pos: torch.Tensor) -> torch.Tensor:
        """Token embeddings (..., L, d) through the frozen text tower -> L2-normalised features (..., E).

        Position embeddings, causal encoder, final LN, pooling at `eos_pos` (...,) and text_projection."""
        tm = _text_tower(self._clip)
        lead, (L, d) = x.shape[:-2], x.shape[-2:]
        x = x.reshape(-1, L, d)
        wdev = tm.embeddings.position_embedding.weight.device
        h = x.to(wdev) + tm.embeddings.position_embedding.weight.detach()[:L].to(x.dtype)
        h = _causal_encoder(tm.encoder, h, tm.config)
        ln = tm.final_layer_norm
        h = F.layer_norm(h, ln.normalized_shape, ln.weight.detach(), ln.bias.detach(), ln.eps)
        idx = eos_pos.reshape(-1).to(wdev)
        pooled = h[torch.arange(h.shape[0], device=wdev), idx]
        t = F.linear(pooled, self._clip.text_projection.weight.detach())
        return F.normalize(t.float(), dim=-1).to(self.device).reshape(*lead, -1)

    def text_features(self, image_features: torch.Tensor | None = None) -> torch.Tensor:
        """g(p_c): (C, E) for CoOp / no image, else (B, C, E) with the meta-net bias π(f) on every context token."""
        ctx = self.ctx
        if self.meta_net is not None and image_features is not None:
            ctx = ctx.unsqueeze(0) + self.meta_net(image_features.to(self.device)).unsqueeze(1)  # (B, M, d)
        x = self.prompt_embeddings(ctx)
        return self.encode_prompt_embeddings(x, self.eos_pos.expand(x.shape[:-2]))

    # ------------------------------------------------------------------ concept weights
    def concept_weights(self, image_features: torch.Tensor) -> torch.Tensor:
        """α (B, C, K): softmax over each class's concepts of cos(f, t_j)/τ (0 outside the class's concepts; all
        0 for a class without concepts)."""
        cos = image_features.to(self.device) @ self.anchors.T  # (B, K)
        logits = (cos / self.config["concept_temperature"]).unsqueeze(1).expand(-1, len(self.classes), -1)
        return logits.masked_fill(~self.concept_mask, -1e4).softmax(-1) * self.concept_mask

    def concept_anchor(self, alpha: torch.Tensor) -> torch.Tensor:
        """ĝ = normalize(Σ_j α_j t_j): (..., K) -> (..., E)."""
        return F.normalize(alpha @ self.anchors, dim=-1)

    # ------------------------------------------------------------------ local term
    def local_scores(self, patch_tokens: torch.Tensor, text: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """local_c = Σ_i β_ci cos(ẑ_i, g(p_c)), β_ci = softmax_i(cos(ẑ_i, g(p_c))/τ_l); returns (B, C), β (B, C, N)."""
        z = patch_tokens.to(self.device)
        if self.pos_embed is not None:
            z = z + self.pos_embed
        z = F.normalize(z, dim=-1)
        sim = torch.einsum("bne,bce->bcn", z, text) if text.ndim == 3 else torch.einsum("bne,ce->bcn", z, text)
        beta = (sim / self.config["local_temperature"]).softmax(-1)
        return (beta * sim).sum(-1), beta

    # ------------------------------------------------------------------ forward
    def forward(self, pixel_values: torch.Tensor | None = None, labels: torch.Tensor | None = None, *,
                image_features: torch.Tensor | None = None, patch_tokens: torch.Tensor | None = None) -> dict:
        """Pixels (or cached `encode_image` outputs) -> dict with

        `logits` (B, C), `probs`, `global`/`local` cosine scores (B, C), `alpha` (B, K) (for `labels`, else the
        predicted class), `alpha_all` (B, C, K), `beta` (B, C, N) patch significance, `text` g(p_c) and, when
        `labels` are given, `loss` = {"ce", "align", "local", "total"}."""
        if image_features is None or patch_tokens is None:
            if pixel_values is None:
                raise ValueError("give pixel_values, or both image_features and patch_tokens")
            image_features, patch_tokens = self.encode_image(pixel_values)
        f = F.normalize(image_features.to(self.device).float(), dim=-1)
        text = self.text_features(f)  # (B, C, E) or (C, E)
        glob = torch.einsum("be,bce->bc", f, text) if text.ndim == 3 else f @ text.T
        local, beta = self.local_scores(patch_tokens.float(), text)
        s = self.logit_scale
        logits = s * (glob + self.config["local_weight"] * local)
        alpha_all = self.concept_weights(f)
        rows = torch.arange(len(f), device=self.device)
        pick = labels.to(self.device).long() if labels is not None else logits.argmax(-1)
        out = {"logits": logits, "probs": logits.softmax(-1), "global": glob, "local": local, "beta": beta,
               "alpha": alpha_all[rows, pick], "alpha_all": alpha_all, "text": text}
        if labels is not None:
            y = pick
            t_y = text[rows, y] if text.ndim == 3 else text[y]
            anchor = self.concept_anchor(out["alpha"])
            ce = F.cross_entropy(logits, y)
            has = self.concept_mask[y].any(-1)  # images of a class without concepts have nothing to align to
            align = ((1 - (t_y * anchor).sum(-1)) * has).sum() / has.sum().clamp_min(1)
            loc = F.cross_entropy(s * local, y)
            total = ce + self.config["align_weight"] * align + self.config["local_loss_weight"] * loc
            out["loss"] = {"ce": ce, "align": align, "local": loc, "total": total}
        return out

    # ------------------------------------------------------------------ checkpoint
    def save(self, path, extra: dict | None = None) -> Path:
        """Publish the learnable tensors atomically to `path` (.safetensors; config in its metadata) and a JSON summary."""
        state = self.state_dict()
        meta = {"format": FORMAT, "config": json.dumps(self.full_config()), "clip_fingerprint": self.clip_fingerprint()}
        info = {"format": FORMAT, "config": self.full_config(), "clip_fingerprint": meta["clip_fingerprint"],
                "tensors": {k: list(v.shape) for k, v in state.items()}, **(extra or {})}
        return checkpoint.publish(path, state, meta, info)

    @classmethod
    def load(cls, bundle, path=None, device=None) -> "ClinCoCoOp":
        """A prompt learner from `path` (default: `prompt_learner.safetensors` in the CLIP directory) on `bundle`'s CLIP."""
        path = Path(path) if path is not None else prompt_learner_path(bundle.path)
        meta, state = checkpoint.read(path, FORMAT, "prompt learner", "train one with the `prompt_learner` train task")
        cfg = json.loads(meta["config"])
        classes, concepts = cfg.pop("classes"), cfg.pop("concepts")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # ctx_init warnings: the context is overwritten below
            model = cls(bundle, classes, concepts, **cfg)
        if meta.get("clip_fingerprint") != model.clip_fingerprint():
            warnings.warn(f"{path} was learned on a different CLIP than {bundle.path}; retrain it")
        model.load_state_dict(state, strict=True)
        return model.to(device or bundle.device).eval()
