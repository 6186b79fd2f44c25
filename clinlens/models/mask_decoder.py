"""MedP-CLIP light mask decoder (methods.md §1, "Segmentation"): SAM's two-way transformer in miniature.

Tokens = [iou token, mask token, prompt tokens]. Two two-way blocks (token self-attention,
token->image cross-attention, MLP, image->token cross-attention) and a final token->image
attention; the patch grid is then upsampled x4 by two ConvTranspose stages and dotted with the
MLP'd mask token -> mask logits (B, 1, 4h, 4w); the iou token predicts the mask's IoU.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from clinlens.models.prompt_encoder import LayerNorm2d


def mlp(i: int, h: int, o: int, layers: int = 2) -> nn.Sequential:
    dims = [i] + [h] * (layers - 1) + [o]
    mods = []
    for a, b in zip(dims[:-1], dims[1:]):
        mods += [nn.Linear(a, b), nn.ReLU()]
    return nn.Sequential(*mods[:-1])


class TwoWayBlock(nn.Module):
    def __init__(self, dim: int, heads: int, mlp_dim: int, skip_first_pe: bool = False):
        super().__init__()
        self.self_attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.cross_t2i = nn.MultiheadAttention(dim, heads, batch_first=True, kdim=dim, vdim=dim)
        self.cross_i2t = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.mlp = mlp(dim, mlp_dim, dim)
        self.norms = nn.ModuleList(nn.LayerNorm(dim) for _ in range(4))
        self.skip_first_pe = skip_first_pe

    def forward(self, q, k, q_pe, k_pe):
        if self.skip_first_pe:
            q = self.self_attn(q, q, q, need_weights=False)[0]
        else:
            qq = q + q_pe
            q = q + self.self_attn(qq, qq, q, need_weights=False)[0]
        q = self.norms[0](q)
        q = self.norms[1](q + self.cross_t2i(q + q_pe, k + k_pe, k, need_weights=False)[0])
        q = self.norms[2](q + self.mlp(q))
        k = self.norms[3](k + self.cross_i2t(k + k_pe, q + q_pe, q, need_weights=False)[0])
        return q, k


class MaskDecoder(nn.Module):
    def __init__(self, dim: int, heads: int = 4, depth: int = 2, mlp_dim: int | None = None):
        super().__init__()
        self.iou_token, self.mask_token = nn.Embedding(1, dim), nn.Embedding(1, dim)
        self.blocks = nn.ModuleList(TwoWayBlock(dim, heads, mlp_dim or 2 * dim, i == 0) for i in range(depth))
        self.final_attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.final_norm = nn.LayerNorm(dim)
        self.upscale = nn.Sequential(
            nn.ConvTranspose2d(dim, dim // 4, 2, stride=2), LayerNorm2d(dim // 4), nn.GELU(),
            nn.ConvTranspose2d(dim // 4, dim // 8, 2, stride=2), nn.GELU(),
        )
        self.hyper = mlp(dim, dim, dim // 8, 3)
        self.iou_head = mlp(dim, dim, 1, 3)

    def forward(self, image: torch.Tensor, image_pe: torch.Tensor, sparse: torch.Tensor, dense: torch.Tensor):
        """image (B, D, h, w), image_pe (D, h, w), sparse (B, T, D), dense (B, D, h, w)
        -> mask logits (B, 1, 4h, 4w), iou prediction (B,)."""
        b, d, h, w = image.shape
        out_tok = torch.cat([self.iou_token.weight, self.mask_token.weight], 0)[None].expand(b, -1, -1)
        tokens = torch.cat([out_tok, sparse], 1)
        src = (image + dense).flatten(2).transpose(1, 2)
        pe = image_pe.flatten(1).T[None].expand(b, -1, -1)
        q, k = tokens, src
        for blk in self.blocks:
            q, k = blk(q, k, tokens, pe)
        q = self.final_norm(q + self.final_attn(q + tokens, k + pe, k, need_weights=False)[0])
        up = self.upscale(k.transpose(1, 2).reshape(b, d, h, w))  # (B, D/8, 4h, 4w)
        hyper = self.hyper(q[:, 1])  # (B, D/8)
        masks = torch.einsum("bc,bchw->bhw", hyper, up)[:, None]
        return masks, self.iou_head(q[:, 0])[:, 0]
