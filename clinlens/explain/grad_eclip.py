"""Grad-ECLIP and MedGrad E-CLIP heatmaps on a Hugging Face CLIP (methods.md §4).

Equations of methods.md §4, numbered as cited below:

- (E1) ``S = cos(f_I, f_T)``, the image–target cosine. The target is a text (finding, concept, free
  or negated prompt) or any embedding in the joint space (e.g. a RegionCLIP region embedding).
- (E2) ``o_cls = Σ_i softmax(q_cls·k_i/√d) v_i``, the last vision block's attention output, per head.
- (E3) ``w_c = ∂S/∂o_cls,c``, the channel weights: the gradient at the [CLS] row of the attention
  output *before* ``out_proj`` (c runs over head × head-channel).
- (E4) ``w_i = minmax_i(cos(q_cls, k_i))``, the spatial weights over the patch keys, computed per head.
- (E5) ``H_i = ReLU(Σ_c w_c · w_i · v_ic)`` over patch tokens, reshaped to the grid. Multi-head, it reads
  ``ReLU(Σ_h Σ_{c∈h} w_c · w^h_i · v_ic)``.
- (E6) MedGrad: ``H_i = ReLU(Σ_c w_c · v_ic · w_e,i)``, where ``w_e`` is the image's local entropy
  (``skimage.filters.rank.entropy``, disk radius) pooled to the patch grid.
- (E7) Text side: (E3)–(E5) with the EOS query over the last text layers give one score per word.

Faithfulness. Hooks on the model's real last ``CLIPEncoderLayer`` record the q, k and v that its
own projections computed, and the attention output that really entered ``out_proj``, during the
forward pass that produced S. A zero leaf is added at that point, so ``∂S/∂leaf = ∂S/∂o`` exactly
and the rest of the graph is unchanged. ``recompute_attention`` rebuilds the block's output from
the captured per-head q, k, v; the tests check it equals the module's output.
``method="grad_eclip_single_head"`` is the flawed baseline of the public code: it re-runs the block
as ONE head, so it explains a different forward pass (its own cosine is ``explained_cosine``).

Cost. The blocks before the first explained one run without an autograd graph (the gradient is only
needed from there on); ``gradient="direct"`` needs no backward through the blocks at all (below). The
entropy depends on the image only: it runs on a worker thread beside the forward, and an image's weights
are kept (by a hash of its pixels) for the next target asked of it.

Choices where methods.md leaves room:
- MedGrad keeps Grad-ECLIP's query–key weight and multiplies the entropy in (DESIGN.md: "multiplies in").
  ``medgrad_qk=False`` is (E6) literally, with the entropy replacing w_i.
- Entropy weights are ``E / max E`` (0 means no texture). A flat image (E ≡ 0) falls back to uniform
  weights, because zero entropy everywhere says nothing about where to look.
- Heatmaps are ``H / max H``, so 0 means no evidence. ``explain_volume`` divides by the max over all slices.
- A text target is the mean of the zero-shot positive templates over the finding text that
  ``ZeroShotScorer`` scores (an affirmed prompt as typed; the affirmed finding of a negated one), so
  the explained cosine is the scored one. A negated prompt "no X" explains the evidence for X and
  sets ``negated=True``, since p(no X) = 1 − p(X) is derived from that same evidence.
- Word importance (E7) is for that finding text alone, against the explained image.
- ``blocks`` (beyond the paper, default 1 = its last block): (E3)–(E5) at each of the last ``blocks``
  vision blocks, each with its own gradient and q–k weights, signed contributions summed before the
  ReLU. The [CLS] embedding is the residual sum of every block's output, and on the default 6-block
  model the last block alone leaves a third of the derm diagnosis maps empty; all blocks fill them and
  beat Grad-CAM on deletion (benchmarks/results/explain*.md) at ~2.4x a forward instead of ~1.4x.
- ``gradient`` (beyond the paper, default "exact"): "direct" takes (E3) along the residual stream only,
  ``∂S/∂o_l ≈ W_out,lᵀ ∂S/∂x_L`` (the direct effect of each block's attention on the [CLS] embedding),
  dropping the later blocks' Jacobians. Every block's weights then come from one small backward through
  the output head, so all blocks cost about what the last block costs exactly (~1.4x a forward).
  The functions here default to the paper (last block, exact); the `explain` infer task and the batch
  default to all blocks with "direct", chosen on validation phantoms (benchmarks/explain_blocks.py).
"""
from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import hashlib
import math
import os
import threading
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from clinlens.models.zeroshot import POSITIVE_TEMPLATES

METHODS = ("medgrad", "grad_eclip", "grad_eclip_single_head", "attention")
BLOCK_METHODS = ("medgrad", "grad_eclip")  # the methods that can sum (E5) over several blocks
ENTROPY_ON = ("image", "heatmap")
GRADIENTS = ("exact", "direct")  # (E3) by a backward through the blocks, or along the direct residual path
REF_SIZE = 224  # the radius is given in pixels at 224²
ENTROPY_BINS = 64  # grey levels of the local-entropy histogram


# ----------------------------------------------------------------------------- capture
class _Probe:
    """Hooks on one ``CLIPEncoderLayer`` that record its real attention (calling thread only).

    After the forward: ``x`` the layer input, ``q``, ``k``, ``v`` (B, H, T, d) from the module's own
    projections, ``mask``/``causal`` as passed to it, ``o`` (B, T, D) the attention output before
    ``out_proj``, ``out`` the self-attention output, and ``delta`` the zero leaf added to ``o``.
    """

    def __init__(self, layer, inject: bool = True):
        self.layer, self.attn, self.inject = layer, layer.self_attn, inject
        self.heads, self.head_dim = self.attn.num_heads, self.attn.head_dim
        self.scale = float(self.attn.scale)
        self.thread = threading.get_ident()
        self.x = self.q = self.k = self.v = self.o = self.out = self.mask = self.delta = None
        self.causal = False
        self._handles = []

    def _mine(self) -> bool:  # another thread may run the same model meanwhile
        return threading.get_ident() == self.thread

    def _heads(self, t: torch.Tensor) -> torch.Tensor:
        return t.view(*t.shape[:-1], self.heads, self.head_dim).transpose(1, 2)

    def __enter__(self):
        a = self.attn

        def layer_pre(m, args, kwargs):
            if self._mine():
                self.x = (args[0] if args else kwargs["hidden_states"]).detach()

        def attn_pre(m, args, kwargs):
            if self._mine():
                self.mask = kwargs.get("attention_mask", args[1] if len(args) > 1 else None)
                self.causal = bool(kwargs.get("is_causal", False))

        def proj(name):
            def hook(m, args, out):
                if self._mine():
                    setattr(self, name, self._heads(out.detach()))
            return hook

        def out_pre(m, args):
            if not self._mine():
                return None
            self.o = args[0].detach()
            if self.inject:
                self.delta = torch.zeros_like(args[0], requires_grad=True)
                return (args[0] + self.delta, *args[1:])
            return None

        def attn_post(m, args, kwargs, out):
            if self._mine():
                self.out = (out[0] if isinstance(out, tuple) else out).detach()

        self._handles = [
            self.layer.register_forward_pre_hook(layer_pre, with_kwargs=True),
            a.register_forward_pre_hook(attn_pre, with_kwargs=True),
            a.q_proj.register_forward_hook(proj("q")),
            a.k_proj.register_forward_hook(proj("k")),
            a.v_proj.register_forward_hook(proj("v")),
            a.out_proj.register_forward_pre_hook(out_pre),
            a.register_forward_hook(attn_post, with_kwargs=True),
        ]
        return self

    def __exit__(self, *exc):
        for h in self._handles:
            h.remove()
        self._handles = []
        return False


@contextlib.contextmanager
def _grad_on():
    """Gradients even when the caller runs under no_grad or inference_mode."""
    with torch.inference_mode(False), torch.enable_grad():
        yield


def _scores(probe: _Probe, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Pre-softmax scores q·k/√d with the mask (or causal flag) the module received."""
    s = torch.einsum("bhqd,bhkd->bhqk", q, k) * probe.scale
    m = probe.mask
    if m is not None:
        s = s.masked_fill(~m, float("-inf")) if m.dtype == torch.bool else s + m.to(s.dtype)
    elif probe.causal:
        t = s.shape[-1]
        s = s.masked_fill(torch.ones(t, t, dtype=torch.bool, device=s.device).triu(1)[-s.shape[-2]:], float("-inf"))
    return s


def recompute_attention(probe: _Probe) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(E2) from the captured per-head q, k, v: (o before out_proj, module output, attention (B, H, T, T))."""
    q, k, v = probe.q.float(), probe.k.float(), probe.v.float()
    attn = _scores(probe, q, k).softmax(-1)
    o = (attn @ v).transpose(1, 2).reshape(*probe.o.shape)
    w = probe.attn.out_proj
    return o, F.linear(o, w.weight.float(), None if w.bias is None else w.bias.float()), attn


@dataclass
class LastBlock:
    """One real vision forward pass with its last block(s) captured (`probes` earliest first)."""

    probes: list[_Probe]
    embedding: torch.Tensor            # (B, P) L2-normalised image embeddings of this pass
    cosine: torch.Tensor | None        # (B,) (E1), None without a target
    grads: list[torch.Tensor] | None   # per probe (B, D) (E3): ∂S/∂o at [CLS], channels ordered head-major

    @property
    def probe(self) -> _Probe:
        """The model's last block."""
        return self.probes[-1]

    @property
    def grad(self) -> torch.Tensor | None:
        return None if self.grads is None else self.grads[-1]

    @property
    def grid(self) -> tuple[int, int]:
        n = self.probe.q.shape[2] - 1
        g = int(round(math.sqrt(n)))
        if g * g != n:
            raise ValueError(f"{n} patch tokens do not form a square grid")
        return g, g


def _check_blocks(bundle, blocks) -> int:
    n = len(bundle.model.vision_model.encoder.layers)
    if isinstance(blocks, bool) or not isinstance(blocks, (int, np.integer)) or not 1 <= blocks <= n:
        raise ValueError(f"blocks must be an integer from 1 to {n} (the vision tower's depth), got {blocks!r}")
    return int(blocks)


def _check_gradient(gradient) -> str:
    if gradient not in GRADIENTS:
        raise ValueError(f"gradient must be one of {', '.join(GRADIENTS)}, got {gradient!r}")
    return gradient


def last_block(bundle, pixel_values: torch.Tensor, target_embedding: torch.Tensor | None = None,
               blocks: int = 1, gradient: str = "exact") -> LastBlock:
    """Run the model's own vision tower once with its last `blocks` blocks hooked; with a target, also
    (E1) and (E3) at each of them (`gradient` "exact": one backward through the hooked blocks;
    "direct": the direct residual path, see `_direct_block`)."""
    if _check_gradient(gradient) == "direct":
        return _direct_block(bundle, pixel_values, target_embedding, _check_blocks(bundle, blocks))
    model = bundle.model
    vm = model.vision_model
    hooked = vm.encoder.layers[len(vm.encoder.layers) - _check_blocks(bundle, blocks):]
    # the gradient is only needed from the first hooked block on: the blocks before it run without a
    # graph (the same forward, ~10% cheaper on the default model)
    me = threading.get_ident()  # another thread may run the same model meanwhile

    def enable_grad(module, args) -> None:  # the enclosing no_grad restores the mode afterwards
        if threading.get_ident() == me:
            torch.set_grad_enabled(True)

    hook = hooked[0].register_forward_pre_hook(enable_grad)
    inject = target_embedding is not None
    try:
        with _grad_on(), torch.no_grad(), contextlib.ExitStack() as stack:
            probes = [stack.enter_context(_Probe(layer, inject=inject)) for layer in hooked]
            pv = pixel_values.to(bundle.device)
            emb = F.normalize(model.visual_projection(vm(pixel_values=pv).pooler_output), dim=-1)
            cos = grads = None
            if inject:
                cos = (emb * target_embedding.to(emb)).sum(-1)
                # batch items are independent
                grads = [g[:, 0].detach() for g in torch.autograd.grad(cos.sum(), [p.delta for p in probes])]
    finally:
        hook.remove()
    return LastBlock(probes, emb.detach(), None if cos is None else cos.detach(), grads)


def _direct_block(bundle, pixel_values: torch.Tensor, target_embedding: torch.Tensor | None, blocks: int) -> LastBlock:
    """(E3) along the direct residual path: no backward through the blocks.

    Block l adds ``out_proj_l(o_l)`` to the [CLS] residual stream, whose final value x_L gives the embedding
    through post_layernorm and the projection. Dropping the later blocks' Jacobians (the "direct effect" of
    Gandelsman et al., ICLR 2024) gives ``∂S/∂o_l ≈ W_out,lᵀ · ∂S/∂x_L``: one small backward through the
    head, so a heatmap over every block costs about a forward pass. For the last block it leaves out only
    that block's MLP Jacobian. The q, k, v and spatial weights are the real pass's, as with "exact"."""
    model = bundle.model
    vm = model.vision_model
    hooked = vm.encoder.layers[len(vm.encoder.layers) - blocks:]
    with _grad_on(), torch.no_grad(), contextlib.ExitStack() as stack:
        probes = [stack.enter_context(_Probe(layer, inject=False)) for layer in hooked]
        x = vm(pixel_values=pixel_values.to(bundle.device)).last_hidden_state[:, 0]
    with _grad_on():
        x = x.detach().requires_grad_(target_embedding is not None)
        emb = F.normalize(model.visual_projection(vm.post_layernorm(x)), dim=-1)
        cos = grads = None
        if target_embedding is not None:
            cos = (emb * target_embedding.to(emb)).sum(-1)
            g = torch.autograd.grad(cos.sum(), x)[0].detach()
            grads = [g @ p.attn.out_proj.weight.detach().to(g) for p in probes]
    return LastBlock(probes, emb.detach(), None if cos is None else cos.detach(), grads)


# ----------------------------------------------------------------------------- maps (B, N) over patches
def _minmax(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    lo, hi = x.amin(dim, keepdim=True), x.amax(dim, keepdim=True)
    return (x - lo) / (hi - lo).clamp_min(1e-12)


def spatial_weights(q: torch.Tensor, k: torch.Tensor, query: int = 0, keys=slice(1, None)) -> torch.Tensor:
    """(E4) per head: min-max over the keys of cos(q_query, k_i); q, k (B, H, T, d) -> (B, H, N)."""
    qn = F.normalize(q[:, :, query].float(), dim=-1)
    kn = F.normalize(k[:, :, keys].float(), dim=-1)
    return _minmax(torch.einsum("bhd,bhnd->bhn", qn, kn))


def grad_eclip_map(lb: LastBlock, use_qk: bool = True) -> torch.Tensor:
    """(E5) on the real multi-head block: ReLU(Σ_h Σ_{c∈h} w_c · w^h_i · v_ic) -> (B, N).

    With several blocks captured, the signed contributions of each are summed before the ReLU (the blocks
    are stacked into one batch: their heads and widths are the same)."""
    p = lb.probe
    g = torch.stack(lb.grads).float()
    L, B = g.shape[:2]
    g = g.view(L * B, p.heads, p.head_dim)
    v = torch.stack([pr.v[:, :, 1:] for pr in lb.probes]).float().flatten(0, 1)
    contrib = torch.einsum("bhd,bhnd->bhn", g, v)  # Σ_{c∈h} w_c v_ic
    if use_qk:
        qs = torch.stack([pr.q[:, :, :1] for pr in lb.probes]).flatten(0, 1)
        ks = torch.stack([pr.k[:, :, 1:] for pr in lb.probes]).flatten(0, 1)
        contrib = contrib * spatial_weights(qs, ks, 0, slice(None))
    return F.relu(contrib.view(L, B, *contrib.shape[1:]).sum((0, 2)))


def attention_map(lb: LastBlock) -> torch.Tensor:
    """Baseline: raw last-layer [CLS] -> patch attention of the real block, averaged over heads -> (B, N)."""
    p = lb.probe
    s = _scores(p, p.q[:, :, :1].float(), p.k.float())  # only the [CLS] query row
    return s.softmax(-1)[:, :, 0, 1:].mean(1)


def single_head_map(bundle, lb: LastBlock, target_embedding: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """FLAWED BASELINE (the public Grad-ECLIP code): the last block re-run as ONE head of width D.

    From the captured block input it recomputes softmax(q·kᵀ/√D)·v with full-width q, k, v, continues
    through out_proj, the MLP and the projection to its own cosine S', and applies (E3)–(E5) to that.
    Like the public code, the q–k cosine is taken after ``out_proj``. This is not the forward pass the
    model ran: S' ≠ S in general. Returns (map (B, N), S' (B,)).
    """
    model, vm = bundle.model, bundle.model.vision_model
    layer = vm.encoder.layers[-1]
    a = layer.self_attn
    x = lb.probe.x
    with _grad_on():
        h = layer.layer_norm1(x)
        q, k, v = a.q_proj(h), a.k_proj(h), a.v_proj(h)
        with torch.no_grad():
            o1 = ((q @ k.transpose(1, 2)) * q.shape[-1] ** -0.5).softmax(-1) @ v
        o1 = o1.detach().requires_grad_(True)
        y = x + a.out_proj(o1)
        y = y + layer.mlp(layer.layer_norm2(y))
        emb = F.normalize(model.visual_projection(vm.post_layernorm(y[:, 0])), dim=-1)
        s1 = (emb * target_embedding.to(emb)).sum(-1)
        g = torch.autograd.grad(s1.sum(), o1)[0][:, 0].float()
    with torch.no_grad():
        qo, ko = a.out_proj(q).float(), a.out_proj(k).float()
        c = _minmax((F.normalize(qo[:, :1], dim=-1) * F.normalize(ko[:, 1:], dim=-1)).sum(-1))
        raw = F.relu((g[:, None] * v[:, 1:].float() * c[..., None]).sum(-1))
    return raw, s1.detach()


# ----------------------------------------------------------------------------- entropy (E6)
def _check_radius(radius) -> None:
    if not isinstance(radius, (int, float, np.integer, np.floating)) or not math.isfinite(radius) or radius <= 0:
        raise ValueError(f"entropy radius must be a positive number of pixels (at {REF_SIZE}²), got {radius!r}")


def effective_radius(radius: float, shape, ref_size: int = REF_SIZE) -> int:
    """The disk radius in pixels for an image of `shape`: `radius` is meant at ref_size², scaled by min(H, W)."""
    _check_radius(radius)
    return max(1, int(round(radius * min(shape[:2]) / ref_size)))


def as_float_image(image) -> np.ndarray:
    """(H, W), (H, W, C) or (C, H, W) -> float32 (H, W) or (H, W, 3) in [0, 1].

    uint8 is divided by 255, floats already in [0, 1] are kept, anything else is min-max scaled.
    """
    a = image.detach().cpu().numpy() if isinstance(image, torch.Tensor) else np.asarray(image)
    if a.ndim == 3 and a.shape[-1] not in (1, 3, 4) and a.shape[0] in (1, 3, 4):
        a = np.moveaxis(a, 0, -1)
    if a.ndim == 3:
        a = a[..., 0] if a.shape[-1] == 1 else a[..., :3]
    if a.ndim not in (2, 3) or min(a.shape[:2]) < 1:
        raise ValueError(f"expected a 2D image (H, W) or (H, W, 3), got shape {a.shape}")
    if a.dtype == np.uint8:
        return a.astype(np.float32) / 255
    a = a.astype(np.float32)
    if not np.isfinite(a).all():
        raise ValueError("image contains NaN or inf")
    lo, hi = float(a.min()), float(a.max())
    if lo >= 0 and hi <= 1:
        return a
    return (a - lo) / (hi - lo) if hi > lo else np.zeros_like(a)


def _gray(image) -> np.ndarray:
    a = as_float_image(image)
    # the channel mean, summed in mean's order; numpy's reduction over a last axis of 3 is ~10x slower
    return (a[..., 0] + a[..., 1] + a[..., 2]) / np.float32(3) if a.ndim == 3 else a


def local_entropy(image, radius: float = 5.0, ref_size: int = REF_SIZE, bins: int = ENTROPY_BINS) -> np.ndarray:
    """Local Shannon entropy (bits) of the grey image in a disk around each pixel (E6), float32.

    The grey levels are quantised to `bins` (skimage's rank filters cost O(bins) per pixel: 64 bins
    is ~3x faster than 256 and, pooled to a 14x14 grid, correlates 0.99 with it). An image at least
    twice `ref_size` is first block-averaged by the integer factor that brings it nearest to ref_size,
    the resolution the model sees; the result then has that reduced shape (callers pool it anyway).
    """
    from skimage.filters.rank import entropy
    from skimage.morphology import disk
    from skimage.transform import downscale_local_mean

    if not isinstance(bins, (int, np.integer)) or not 2 <= bins <= 256:
        raise ValueError(f"entropy bins must be an integer in [2, 256], got {bins!r}")
    g = _gray(image)
    f = int(min(g.shape) // ref_size)
    if f >= 2:
        g = downscale_local_mean(g, (f, f))
    q = np.minimum(np.floor(g * bins), bins - 1)
    q = q.astype(np.uint8) if bins == 256 else q.astype(np.uint16)  # uint16: skimage sizes the histogram by max + 1
    return entropy(q, disk(effective_radius(radius, g.shape, ref_size))).astype(np.float32)


_ENTROPY_CACHE: collections.OrderedDict = collections.OrderedDict()
_ENTROPY_CACHE_SIZE = 64  # slices; the same image explained for another target reuses its weights
_ENTROPY_LOCK = threading.Lock()


def clear_entropy_cache() -> None:
    with _ENTROPY_LOCK:
        _ENTROPY_CACHE.clear()


def entropy_weights(image, grid: tuple[int, int], radius: float = 5.0) -> torch.Tensor:
    """w_e of (E6): local entropy mean-pooled to the patch grid and divided by its max -> (h, w) in [0, 1].

    A flat image (zero entropy everywhere) gives uniform weights. The weights depend on the image only,
    so they are kept (by a hash of its pixels) for the next target asked of the same image.
    """
    g = _gray(image)
    key = (hashlib.blake2b(np.ascontiguousarray(g).view(np.uint8), digest_size=16).digest(), g.shape,
           tuple(grid), float(radius))
    with _ENTROPY_LOCK:
        w = _ENTROPY_CACHE.get(key)
        if w is not None:
            _ENTROPY_CACHE.move_to_end(key)
            return w.clone()
    e = torch.from_numpy(local_entropy(g, radius))[None, None]
    w = F.adaptive_avg_pool2d(e, grid)[0, 0]
    m = float(w.max())
    w = w / m if m > 0 else torch.ones_like(w)
    with _ENTROPY_LOCK:
        _ENTROPY_CACHE[key] = w
        while len(_ENTROPY_CACHE) > _ENTROPY_CACHE_SIZE:
            _ENTROPY_CACHE.popitem(last=False)
    return w.clone()


# ----------------------------------------------------------------------------- text side (E7)
def _eos_index(ids: torch.Tensor, eos_id: int) -> int:
    """Where CLIP's text tower pools (the same rule as transformers' CLIPTextTransformer)."""
    if eos_id == 2:
        return int(ids.argmax())
    hits = (ids == eos_id).nonzero()
    return int(hits[0]) if len(hits) else len(ids) - 1


def word_importance(bundle, text: str, pixel_values: torch.Tensor | None = None,
                    image_embedding: torch.Tensor | None = None, layers: int | None = None
                    ) -> tuple[list[str], list[float]]:
    """(E7) Grad-ECLIP's text branch: how much each word of `text` supports cos(image, text).

    For each of the last `layers` text blocks (default ⌈2L/3⌉, 8 of 12 as used with ViT-B CLIPs),
    channel weights are ∂S/∂o at the EOS row (E3), spatial weights the per-head min-max cosine of
    the EOS query with the keys it attends to (E4); contributions are summed over heads and layers,
    then ReLU. Returns the real tokens (no special tokens, no padding) and scores summing to 1
    (all zero if nothing supports the match).
    """
    if not isinstance(text, str) or not text.strip():
        raise ValueError("word importance needs a non-empty text")
    if image_embedding is None:
        if pixel_values is None:
            raise ValueError("word importance needs pixel_values or image_embedding")
        with torch.no_grad():
            image_embedding = bundle.encode_images(pixel_values.to(bundle.device))
    img = torch.as_tensor(image_embedding).detach().float()
    img = F.normalize(img.reshape(-1, img.shape[-1])[0], dim=-1)
    tm = bundle.model.text_model
    n_layers = len(tm.encoder.layers)
    n = layers if layers is not None else max(1, math.ceil(2 * n_layers / 3))
    if not 1 <= n <= n_layers:
        raise ValueError(f"layers={n}, but the text encoder has {n_layers}")
    tok = bundle.tokenize([text])  # one text: no padding
    ids, am = tok["input_ids"][0], tok["attention_mask"][0].bool()
    eos = _eos_index(ids, tm.config.eos_token_id)
    probes = [_Probe(layer) for layer in tm.encoder.layers[n_layers - n:]]
    with _grad_on(), contextlib.ExitStack() as stack:
        for p in probes:
            stack.enter_context(p)
        emb = F.normalize(bundle.model.text_projection(tm(**tok).pooler_output), dim=-1)[0]
        s = (emb * img.to(emb)).sum()
        grads = torch.autograd.grad(s, [p.delta for p in probes])
    keys = (am & (torch.arange(len(ids), device=ids.device) <= eos)).nonzero()[:, 0]
    total = torch.zeros(len(ids))
    for p, g in zip(probes, grads):
        w = g[0, eos].float().view(p.heads, p.head_dim)
        sp = spatial_weights(p.q[:1], p.k[:1], query=eos, keys=keys)[0]  # (H, n) over the attended keys
        contrib = torch.einsum("hd,hnd->hn", w, p.v[0][:, keys].float())
        total[keys.cpu()] += (sp * contrib).sum(0).cpu()
    total = F.relu(total)
    special = set(bundle.tokenizer.all_special_ids)
    keep = [j for j in range(eos) if am[j] and int(ids[j]) not in special]
    tokens = [t.replace("</w>", "") for t in bundle.tokenizer.convert_ids_to_tokens([int(ids[j]) for j in keep])]
    sc = total[keep]
    if float(sc.sum()) > 0:
        sc = sc / sc.sum()
    return tokens, [float(x) for x in sc]


# ----------------------------------------------------------------------------- targets and drivers
@dataclass
class Target:
    """What an explanation explains: a unit embedding, and for a text, its affirmed finding and polarity."""

    embedding: torch.Tensor | None
    prompt: str | None = None
    text: str | None = None
    negated: bool = False


def resolve_target(bundle, target_text: str | None = None, target_embedding=None, templates=POSITIVE_TEMPLATES,
                   required: bool = True) -> Target:
    """A text (class, concept, free or negated prompt) or an embedding -> `Target`.

    A negated prompt "no X" explains the evidence for X (negated=True), as p(no X) = 1 − p(X).
    Raises ValueError for an empty or unparseable prompt, both or neither target, or a wrong size.
    """
    if target_text is not None and target_embedding is not None:
        raise ValueError("give target_text or target_embedding, not both")
    if target_text is not None:
        if not isinstance(target_text, str):
            raise ValueError(f"target_text must be a string, got {type(target_text).__name__}")
        from clinlens.models.zeroshot import ZeroShotScorer

        # the scorer parses negation and embeds exactly what zero-shot scoring embeds; no templates = the text
        scorer = ZeroShotScorer(bundle, [target_text], positive=tuple(templates or ("{}",)))
        emb = scorer.text_embeddings()[0][0]
        return Target(emb.detach(), target_text, scorer.findings[0], bool(scorer.negated[0]))
    if target_embedding is not None:
        e = torch.as_tensor(target_embedding).detach().float()
        if e.ndim == 2 and e.shape[0] == 1:
            e = e[0]
        dim = bundle.model.config.projection_dim
        if e.ndim != 1 or e.shape[0] != dim:
            raise ValueError(f"target_embedding must have shape ({dim},), got {tuple(e.shape)}")
        if not torch.isfinite(e).all() or float(e.norm()) == 0:
            raise ValueError("target_embedding must be finite and non-zero")
        return Target(F.normalize(e, dim=0).to(bundle.device))
    if required:
        raise ValueError("an explanation needs a target: target_text (finding, concept or prompt) or target_embedding")
    return Target(None)


def _check(method: str, radius, entropy_on: str, bundle=None, blocks: int = 1, gradient: str = "exact") -> None:
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    if bundle is not None and _check_blocks(bundle, blocks) > 1 and method not in BLOCK_METHODS:
        raise ValueError(f"blocks > 1 applies to medgrad and grad_eclip only, not {method!r}")
    if _check_gradient(gradient) != "exact" and method not in BLOCK_METHODS:
        raise ValueError(f"gradient {gradient!r} applies to medgrad and grad_eclip only, not {method!r}")
    if entropy_on not in ENTROPY_ON:
        raise ValueError(f"entropy_on must be 'image' or 'heatmap', got {entropy_on!r}")
    _check_radius(radius)


def _images_from_pixels(bundle, pv: torch.Tensor) -> list[np.ndarray]:
    """Normalised pixels back to grey [0, 1] images (for the entropy when no image is given)."""
    mean = torch.tensor(bundle.preprocess.mean).view(1, 3, 1, 1)
    std = torch.tensor(bundle.preprocess.std).view(1, 3, 1, 1)
    x = (pv.detach().float().cpu() * std + mean).clamp(0, 1).mean(1)
    return list(x.numpy())


def _upsample(m: torch.Tensor, size) -> torch.Tensor:
    """(..., h, w) -> (..., H, W) bilinear, clipped to [0, 1]."""
    lead = m.shape[:-2]
    u = F.interpolate(m.reshape(-1, 1, *m.shape[-2:]).float(), size=tuple(int(s) for s in size), mode="bilinear",
                      align_corners=False)
    return u.reshape(*lead, *u.shape[-2:]).clamp(0, 1)


_ENTROPY_POOL: tuple[int, concurrent.futures.ThreadPoolExecutor] | None = None


def _entropy_pool() -> concurrent.futures.ThreadPoolExecutor:
    """The worker threads of this process (a forked child gets its own: the parent's threads are not there)."""
    global _ENTROPY_POOL
    with _ENTROPY_LOCK:
        if _ENTROPY_POOL is None or _ENTROPY_POOL[0] != os.getpid():
            _ENTROPY_POOL = (os.getpid(), concurrent.futures.ThreadPoolExecutor(
                max_workers=2, thread_name_prefix="clinlens-entropy"))
        return _ENTROPY_POOL[1]


def _raw_maps(bundle, pv, target: Target, method, images, radius, entropy_on, medgrad_qk,
              overlap_entropy: bool = True, blocks: int = 1, gradient: str = "exact") -> dict:
    """Unnormalised maps (B, h, w) for a batch of pixel values, one real forward pass.

    MedGrad's image entropy depends on the image only: with `overlap_entropy` it is computed on a worker
    thread while the forward and backward run (scikit-image's rank filters release the GIL)."""
    if method == "medgrad" and entropy_on == "image":
        srcs = images if images is not None else _images_from_pixels(bundle, pv)
        patch = bundle.model.config.vision_config.patch_size
        grid = (pv.shape[-2] // patch, pv.shape[-1] // patch)
        job = lambda: torch.stack([entropy_weights(s, grid, radius).flatten() for s in srcs])  # noqa: E731
        if overlap_entropy:
            pending = _entropy_pool().submit(job)
        else:
            pending = concurrent.futures.Future()
            pending.set_result(job())
    lb = last_block(bundle, pv, target.embedding, blocks, gradient)
    grid = lb.grid
    explained = None
    if method == "attention":
        raw = attention_map(lb)
    elif method == "grad_eclip_single_head":
        raw, explained = single_head_map(bundle, lb, target.embedding)
    elif method == "grad_eclip":
        raw = grad_eclip_map(lb)
    else:  # medgrad (E6)
        base = grad_eclip_map(lb)
        raw = grad_eclip_map(lb, use_qk=False) if not medgrad_qk else base
        if entropy_on == "image":
            we = pending.result()
        else:  # entropy of the Grad-ECLIP heatmap, upsampled to the model input
            hm = base.view(-1, *grid).cpu()
            hm = hm / hm.flatten(1).amax(1).clamp_min(1e-12).view(-1, 1, 1)
            we = torch.stack([entropy_weights(s, grid, radius).flatten() for s in _upsample(hm, pv.shape[-2:]).numpy()])
        raw = raw * we.to(raw)
    return dict(raw=raw.detach().float().cpu().view(-1, *grid), grid=grid, lb=lb, explained=explained)


def _pixels(bundle, pixel_values, image) -> torch.Tensor:
    if pixel_values is None:
        if image is None:
            raise ValueError("give pixel_values or image")
        a = as_float_image(image)
        pixel_values = bundle.pixel_values(np.repeat(a[..., None], 3, -1) if a.ndim == 2 else a)
    pv = torch.as_tensor(pixel_values)
    if pv.ndim == 3:
        pv = pv[None]
    if pv.ndim != 4 or pv.shape[1] != 3:
        raise ValueError(f"pixel_values must be (1, 3, S, S) normalised pixels, got {tuple(pv.shape)}")
    return pv


def explain(bundle, pixel_values: torch.Tensor | None = None, target_text: str | None = None, target_embedding=None,
            method: str = "medgrad", radius: float = 5.0, entropy_on: str = "image", image=None, *,
            templates=POSITIVE_TEMPLATES, words: bool = True, text_layers: int | None = None,
            medgrad_qk: bool = True, size=None, overlap_entropy: bool = True, blocks: int = 1,
            gradient: str = "exact") -> dict:
    """Explain one image's match with a target.

    `pixel_values` (1, 3, S, S) as from `bundle.pixel_values`, or only `image` ((H, W) or (H, W, 3) in
    [0, 1]). `image`, when given, is also what the MedGrad entropy is computed on, at its own
    resolution (radius scaled by min(H, W)/224); otherwise the de-normalised pixel values are used.
    `method`: "medgrad" (E5 × E6), "grad_eclip" (E5, real multi-head), "grad_eclip_single_head"
    (flawed public-code baseline), "attention" (raw [CLS] attention, target optional).

    Returns a dict: heatmap (h, w) float32 in [0, 1] (divided by its max), grid, upsampled (H, W) at
    `size` (default: `image`'s size, else S × S), cosine (E1, of the real forward pass),
    explained_cosine (single-head only: the cosine of the pass it explains), negated, prompt, target
    (the finding text explained: the affirmed one for a negated prompt; None for an embedding), scale (the max before normalising), method, entropy_on, radius_px,
    words ({"tokens", "scores"} for a text target when `words`, else None).
    `overlap_entropy`: MedGrad computes the image entropy on a worker thread beside the forward pass
    (the same result; False computes it first, in the calling thread).
    `blocks`: MedGrad and Grad-ECLIP sum (E5)'s signed contributions over the last `blocks` vision blocks,
    each with its own gradient and q–k weights, before the ReLU (1 = the last block, as in the paper).
    `gradient`: (E3) "exact" (a backward through those blocks) or "direct" (along the residual stream
    only, no backward through the blocks; see `_direct_block`).
    """
    _check(method, radius, entropy_on, bundle, blocks, gradient)
    target = resolve_target(bundle, target_text, target_embedding, templates, required=method != "attention")
    pv = _pixels(bundle, pixel_values, image)
    if pv.shape[0] != 1:
        raise ValueError(f"explain takes one image, got a batch of {pv.shape[0]}; use explain_volume for a stack")
    gray = _gray(image) if image is not None else None
    r = _raw_maps(bundle, pv, target, method, None if gray is None else [gray], radius, entropy_on, medgrad_qk,
                  overlap_entropy, blocks, gradient)
    raw = r["raw"][0]
    scale = float(raw.max())
    heat = raw / scale if scale > 0 else torch.zeros_like(raw)
    if size is None:
        size = gray.shape if gray is not None else pv.shape[-2:]
    entropy_shape = gray.shape if gray is not None and entropy_on == "image" else pv.shape[-2:]
    lb = r["lb"]
    out = dict(method=method, blocks=blocks, gradient=gradient, heatmap=heat.numpy().astype(np.float32), grid=r["grid"],
               upsampled=_upsample(heat, size).numpy().astype(np.float32), size=tuple(int(s) for s in size),
               cosine=None if lb.cosine is None else float(lb.cosine[0]),
               explained_cosine=None if r["explained"] is None else float(r["explained"][0]),
               negated=target.negated, prompt=target.prompt, target=target.text, scale=scale,
               entropy_on=entropy_on if method == "medgrad" else None,
               radius_px=effective_radius(radius, entropy_shape) if method == "medgrad" else None,
               words=None)
    if words and target.text is not None:
        tokens, scores = word_importance(bundle, target.text, image_embedding=lb.embedding, layers=text_layers)
        out["words"] = {"tokens": tokens, "scores": scores}
    return out


def explain_volume(bundle, slices_fn, depth: int, target_text: str | None = None, target_embedding=None,
                   method: str = "medgrad", radius: float = 5.0, entropy_on: str = "image", *,
                   batch_size: int = 4, upsample: bool = True, templates=POSITIVE_TEMPLATES,
                   medgrad_qk: bool = True, overlap_entropy: bool = True, blocks: int = 1,
                   gradient: str = "exact") -> dict:
    """Slice-wise explanation of a volume with ONE scale: every slice is divided by the max over all slices.

    `slices_fn(z)` returns slice z as an image (H, W) or (H, W, 3) in [0, 1] (window CT before). Slices
    run `batch_size` at a time. Returns heatmaps (D, h, w) in [0, 1] (max 1 over the volume; a weaker
    slice stays below 1), upsampled (D, H, W) at the slice size (if `upsample`), cosines (D,), scale,
    slice_scales (each slice's own max before normalising), grid, negated, prompt, target, method.
    `blocks` and `gradient` as in `explain`.
    """
    _check(method, radius, entropy_on, bundle, blocks, gradient)
    if not isinstance(depth, (int, np.integer)) or depth < 1:
        raise ValueError(f"depth must be a positive integer, got {depth!r}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    target = resolve_target(bundle, target_text, target_embedding, templates, required=method != "attention")
    raws, cosines, shapes = [], [], []
    for z0 in range(0, depth, batch_size):
        imgs = [as_float_image(slices_fn(z)) for z in range(z0, min(depth, z0 + batch_size))]
        pv = torch.cat([_pixels(bundle, None, a) for a in imgs])
        r = _raw_maps(bundle, pv, target, method, [_gray(a) for a in imgs], radius,
                      entropy_on, medgrad_qk, overlap_entropy, blocks, gradient)
        raws.append(r["raw"])
        cosines += [] if r["lb"].cosine is None else r["lb"].cosine.float().cpu().tolist()
        shapes += [a.shape[:2] for a in imgs]
        grid = r["grid"]
    raw = torch.cat(raws)
    slice_scales = raw.flatten(1).amax(1)
    scale = float(slice_scales.max())
    heat = raw / scale if scale > 0 else torch.zeros_like(raw)
    up = None
    if upsample:
        up = [_upsample(h, s).numpy().astype(np.float32) for h, s in zip(heat, shapes)]
        up = np.stack(up) if len({u.shape for u in up}) == 1 else up
    return dict(method=method, heatmaps=heat.numpy().astype(np.float32), upsampled=up, grid=grid,
                cosines=np.asarray(cosines, dtype=np.float32) if cosines else None, scale=scale,
                slice_scales=slice_scales.numpy().astype(np.float32), negated=target.negated,
                prompt=target.prompt, target=target.text, entropy_on=entropy_on if method == "medgrad" else None)
