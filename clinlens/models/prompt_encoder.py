"""MedP-CLIP prompt encoder (methods.md §1, "Prompt encoder, SAM style") and the region map.

- Points (B, N, 2) float (x, y) in model-input pixel coordinates (pixel centres at integers),
  labels (B, N): 1 foreground, 0 background, -1 padding -> random-Fourier positional encoding
  (fixed Gaussian matrix) + a learned type embedding; padding tokens get only `not_a_point`.
- Boxes (B, 4) [x0, y0, x1, y1] as continuous edge coordinates in the same frame (a half-open
  pixel box [a, b) becomes edges a - 0.5 and b - 0.5) -> two corner tokens with their own
  embeddings. A row of NaN means "no box" for that item (its corners become padding tokens).
- Mask prompt (B, 1, H, W) with values in [0, 1] (resized to 4x the token grid) -> stride-2 conv
  stack -> dense (B, D, h, w). A NaN item, or `None`, gives the learned "no mask" embedding.
- Region map (B, h*w) in [0, 1]: box coverage of each patch, Gaussian blobs round the foreground
  points and the mask prompt pooled to the grid (maximum of the three); all ones when nothing
  localises the region. It biases the region [CLS] attention in `region_clip.RegionCLIP`.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F


class LayerNorm2d(nn.Module):
    """LayerNorm over channels of (B, C, H, W)."""

    def __init__(self, c: int, eps: float = 1e-6):
        super().__init__()
        self.weight, self.bias, self.eps = nn.Parameter(torch.ones(c)), nn.Parameter(torch.zeros(c)), eps

    def forward(self, x):
        u = x.mean(1, keepdim=True)
        s = (x - u).pow(2).mean(1, keepdim=True)
        return self.weight[:, None, None] * (x - u) / torch.sqrt(s + self.eps) + self.bias[:, None, None]


class RandomFourierPE(nn.Module):
    """SAM's PositionEmbeddingRandom: coords in [0, 1] -> [sin, cos](2π (2c - 1) G)."""

    def __init__(self, dim: int, scale: float = 1.0, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.register_buffer("gaussian", scale * torch.randn(2, dim // 2, generator=g))

    def forward(self, coords01: torch.Tensor) -> torch.Tensor:
        c = (2 * coords01 - 1) @ self.gaussian.to(coords01.dtype)
        c = 2 * math.pi * c
        return torch.cat([c.sin(), c.cos()], dim=-1)

    def grid(self, h: int, w: int) -> torch.Tensor:
        """(D, h, w) encoding of the patch-centre grid."""
        dev = self.gaussian.device
        y = (torch.arange(h, device=dev, dtype=torch.float32) + 0.5) / h
        x = (torch.arange(w, device=dev, dtype=torch.float32) + 0.5) / w
        yy, xx = torch.meshgrid(y, x, indexing="ij")
        return self(torch.stack([xx, yy], dim=-1)).permute(2, 0, 1)


class PromptEncoder(nn.Module):
    def __init__(self, dim: int, grid_hw: tuple[int, int], input_hw: tuple[int, int], mask_chans: int = 16,
                 point_sigma: float = 1.5):
        super().__init__()
        self.dim, self.grid_hw, self.input_hw = dim, tuple(grid_hw), tuple(input_hw)
        self.mask_hw = (4 * grid_hw[0], 4 * grid_hw[1])
        self.point_sigma = point_sigma  # Gaussian blob radius in patches
        self.pe = RandomFourierPE(dim)
        # 0 background, 1 foreground, 2 box top-left, 3 box bottom-right
        self.point_embeddings = nn.Embedding(4, dim)
        self.not_a_point = nn.Embedding(1, dim)
        c = mask_chans
        self.mask_downscaling = nn.Sequential(
            nn.Conv2d(1, c // 4, 2, stride=2), LayerNorm2d(c // 4), nn.GELU(),
            nn.Conv2d(c // 4, c, 2, stride=2), LayerNorm2d(c), nn.GELU(),
            nn.Conv2d(c, dim, 1),
        )
        self.no_mask = nn.Embedding(1, dim)

    def _norm(self, xy: torch.Tensor) -> torch.Tensor:
        """Pixel-centre (x, y) on the input grid -> [0, 1] edge-normalised."""
        h, w = self.input_hw
        return (xy + 0.5) / xy.new_tensor([w, h])

    def _points(self, points, labels):
        labels = labels.long()
        pe = self.pe(self._norm(points.float()))
        pad = (labels < 0)[..., None]
        typ = self.point_embeddings(labels.clamp(0, 1))
        return torch.where(pad, self.not_a_point.weight.expand_as(pe), pe + typ)

    def _boxes(self, boxes):
        absent = torch.isnan(boxes).any(-1)  # (B,)
        corners = torch.nan_to_num(boxes.float(), nan=0.0).view(-1, 2, 2)
        pe = self.pe(self._norm(corners))
        tok = pe + self.point_embeddings.weight[2:4][None]
        return torch.where(absent[:, None, None], self.not_a_point.weight[None].expand_as(tok), tok)

    @staticmethod
    def _mask_absent(mask_prompt):
        return torch.isnan(mask_prompt.flatten(1)).any(1)

    def _mask_in(self, mask_prompt):
        m = torch.nan_to_num(mask_prompt.float(), nan=0.0)
        if tuple(m.shape[-2:]) != self.mask_hw:
            m = F.interpolate(m, size=self.mask_hw, mode="bilinear", align_corners=False, antialias=True)
        return m

    def region_map(self, points=None, labels=None, boxes=None, mask_prompt=None, batch: int | None = None, device=None):
        """(B, h*w) prompt-derived region weights in [0, 1] (see module docstring)."""
        h, w = self.grid_hw
        if batch is None:
            batch = next((t.shape[0] for t in (points, boxes, mask_prompt) if t is not None), 1)
        dev = device or self.pe.gaussian.device
        r = torch.zeros(batch, h, w, device=dev)
        any_prompt = torch.zeros(batch, dtype=torch.bool, device=dev)
        ys = (torch.arange(h, device=dev, dtype=torch.float32) + 0.5) / h
        xs = (torch.arange(w, device=dev, dtype=torch.float32) + 0.5) / w
        if points is not None and points.shape[1]:
            p = self._norm(points.float())  # (B, N, 2) in [0, 1]
            dx = (xs[None, None, :] - p[..., 0:1]) * w  # (B, N, w) in patches
            dy = (ys[None, None, :] - p[..., 1:2]) * h  # (B, N, h)
            g = torch.exp(-(dy[..., :, None] ** 2 + dx[..., None, :] ** 2) / (2 * self.point_sigma ** 2))
            fg = (labels == 1).float()[..., None, None]
            r = torch.maximum(r, (g * fg).amax(1))
            any_prompt |= (labels == 1).any(1)
        if boxes is not None:
            absent = torch.isnan(boxes).any(-1)
            b = self._norm(torch.nan_to_num(boxes.float(), nan=0.0).view(-1, 2, 2)).view(-1, 4)  # x0 y0 x1 y1 in [0, 1]
            x0 = torch.arange(w, device=dev, dtype=torch.float32) / w
            y0 = torch.arange(h, device=dev, dtype=torch.float32) / h
            cx = ((torch.minimum(x0[None] + 1 / w, b[:, 2:3]) - torch.maximum(x0[None], b[:, 0:1])) * w).clamp(0, 1)
            cy = ((torch.minimum(y0[None] + 1 / h, b[:, 3:4]) - torch.maximum(y0[None], b[:, 1:2])) * h).clamp(0, 1)
            cov = cy[:, :, None] * cx[:, None, :] * (~absent).float()[:, None, None]
            r = torch.maximum(r, cov)
            any_prompt |= ~absent
        if mask_prompt is not None:
            absent = self._mask_absent(mask_prompt)
            m = F.adaptive_avg_pool2d(torch.nan_to_num(mask_prompt.float(), nan=0.0), (h, w))[:, 0].clamp(0, 1)
            r = torch.maximum(r, m * (~absent).float()[:, None, None])
            any_prompt |= ~absent
        r = torch.where(any_prompt[:, None, None], r, torch.ones_like(r))
        return r.flatten(1)

    def forward(self, points=None, labels=None, boxes=None, mask_prompt=None):
        """-> sparse (B, T, D), dense (B, D, h, w), region_map (B, h*w)."""
        dev = self.pe.gaussian.device
        if points is not None and labels is None:
            raise ValueError("points need labels (1 foreground, 0 background, -1 padding)")
        points, labels, boxes, mask_prompt = (None if t is None else t.to(dev) for t in (points, labels, boxes, mask_prompt))
        given = [t for t in (points, boxes, mask_prompt) if t is not None]
        b = given[0].shape[0] if given else 1
        tokens = []
        if points is not None:
            tokens.append(self._points(points, labels))
        if boxes is not None:
            tokens.append(self._boxes(boxes))
        sparse = torch.cat(tokens, 1) if tokens else torch.zeros(b, 0, self.dim, device=dev)
        h, w = self.grid_hw
        dense = self.no_mask.weight.view(1, -1, 1, 1).expand(b, -1, h, w)
        if mask_prompt is not None:
            absent = self._mask_absent(mask_prompt)
            enc = self.mask_downscaling(self._mask_in(mask_prompt))
            dense = torch.where(absent[:, None, None, None], dense, enc)
        region = self.region_map(points, labels, boxes, mask_prompt, batch=b, device=dev)
        return sparse, dense, region
