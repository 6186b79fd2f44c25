"""Whole-image zero-shot finding scorer with negation-aware prompts.

For each finding f the image embedding is compared with a positive prompt ("f") and its
negation ("no f"); p(f) = softmax(scale * [cos(x, t_f), cos(x, t_no_f)])[0]. Scoring a finding
against its own negation is what makes "no effusion" mean *no* effusion (methods.md §5).
A negated prompt ("no effusion", "free of pneumothorax", parsed by `clinlens.text.negation`) is
scored from the affirmed finding's evidence: p("no f") = 1 - p(f), so "no f" ranks the images
without f first, consistently with "f".
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

POSITIVE_TEMPLATES = ("{}.", "there is {}.", "{} is present.")
NEGATIVE_TEMPLATES = ("no {}.", "no evidence of {}.", "{} is absent.")


class ZeroShotScorer(nn.Module):
    """p(finding present) for each finding name, from a `ClipBundle`."""

    def __init__(self, clip, findings: list[str], positive=POSITIVE_TEMPLATES, negative=NEGATIVE_TEMPLATES):
        """`findings` may be negated prompts; raises ValueError for an empty or unparseable one."""
        from clinlens.text.negation import NEGATED, parse_prompt

        super().__init__()
        self.clip = clip
        self.prompts = list(findings)
        parsed = [parse_prompt(f) for f in self.prompts]
        # the affirmed finding text is scored; a negated prompt takes the complement
        self.findings = [f if pol != NEGATED else text for f, (text, pol) in zip(self.prompts, parsed)]
        self.negated = torch.tensor([pol == NEGATED for _, pol in parsed])
        self.positive = positive
        self.negative = negative

    def _class_embeddings(self, templates) -> torch.Tensor:
        texts = [t.format(f) for f in self.findings for t in templates]
        emb = self.clip.encode_texts(texts).view(len(self.findings), len(templates), -1).mean(1)
        return F.normalize(emb, dim=-1)

    @torch.no_grad()
    def text_embeddings(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self._class_embeddings(self.positive), self._class_embeddings(self.negative)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) normalised pixels -> (B, F) probabilities."""
        img = self.clip.encode_images(pixel_values)
        pos, neg = self.text_embeddings()
        logits = torch.stack([img @ pos.T, img @ neg.T], dim=-1) * self.clip.logit_scale
        p = logits.softmax(-1)[..., 0]
        return torch.where(self.negated.to(p.device), 1 - p, p)
