"""Negation fine-tuning of a CLIP text encoder: the CoN-CLIP loss (CON2), plain contrastive
fine-tuning (CON1), and a batch builder for negated captions with distractor images.

methods.md §5 ("The Effect of Negation on CLIP in Medical Imaging", arXiv 2512.17121; CoN-CLIP).
A batch holds B images x_i, B distractor images d_i that lack the finding named by caption c_i, the
captions c_i (true of x_i) and their negations n_i (false of x_i, true of d_i). With L2-normalised
embeddings, logit scale s and CE(logits, arange(B)) the mean cross-entropy with targets 0..B-1,
texts T = [c; n] (2B rows) and T' = [n; c] (the halves swapped):

    L1 = CE(s * x T^T)      images vs all texts: x_i must pick c_i, over its own negation n_i too
    L2 = CE(s * c x^T)      captions vs all images
    L3 = CE(s * d T'^T)     distractors vs swapped texts: d_i must pick n_i, over c_i too
    L_CON2 = (L1 + L2 + L3) / 3

CON1 is the symmetric CLIP InfoNCE (Radford et al. 2021) on image-caption pairs,
L_CON1 = (CE(s * x t^T) + CE(s * t x^T)) / 2, where the captions may be negated sentences a report
contains ("no pleural effusion."), but a caption's own negation and a distractor are never paired
with it on purpose. The image encoder is frozen in both (the trainer precomputes image embeddings).

Not in the paper, off by default: `positives` masks replace the arange(B) targets by every in-batch
text that is true of the image (soft targets, as train-default does for identical captions). With a
handful of findings most in-batch "negatives" are true ("no mass" of any image without a mass), and
the paper's targets push them away.

Pure torch + numpy; no MONAI Label imports.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from clinlens.models.zeroshot import POSITIVE_TEMPLATES
from clinlens.text.negation import NEGATION_TEMPLATES, affirm, negate

# "{f1}, but no {f2}" (clinical) and "features {B}, but not {N}" (NegBench): the negated part comes
# from `negate(f2, template)` with the clinical templates, or "not {f2}" for the NegBench form.
MIXED_TEMPLATES = ("{}, but {}", "this image features {}, but {}")


def _ce(logits: torch.Tensor, positives: torch.Tensor | None = None) -> torch.Tensor:
    """Cross-entropy with targets arange(B); with a (B, K) bool `positives` mask (the diagonal set),
    with soft targets spread evenly over each row's positives instead."""
    if positives is None:
        return F.cross_entropy(logits, torch.arange(logits.shape[0], device=logits.device))
    target = positives.float() / positives.float().sum(1, keepdim=True)
    return -(target * logits.log_softmax(1)).sum(1).mean()


def con_clip_loss(img: torch.Tensor, distractor_img: torch.Tensor, cap_txt: torch.Tensor, neg_txt: torch.Tensor,
                  scale, positives: tuple | None = None) -> torch.Tensor:
    """CoN-CLIP loss (CON2), methods.md §5: mean of L1 (images vs [captions; negated]), L2 (captions vs
    images) and L3 (distractors vs [negated; captions]), each a cross-entropy with targets arange(B).

    All inputs are (B, D) embeddings (normalised here); `scale` is the logit scale (exp'd, a float or
    a 0-d tensor). `positives` (not in the paper; None = the paper's loss): bool masks (B, 2B), (B, B),
    (B, 2B) of every text true of each image (`NegationBatch.truth`) for L1, L2 and L3, so that in-batch
    captions that are also true ("no mass" of an image without a mass) are not treated as negatives."""
    img, dis = F.normalize(img.float(), dim=-1), F.normalize(distractor_img.float(), dim=-1)
    cap, neg = F.normalize(cap_txt.float(), dim=-1), F.normalize(neg_txt.float(), dim=-1)
    texts = torch.cat([cap, neg])
    swapped = torch.cat([neg, cap])
    p1, p2, p3 = positives if positives is not None else (None, None, None)
    l1 = _ce(scale * img @ texts.T, p1)
    l2 = _ce(scale * cap @ img.T, p2)
    l3 = _ce(scale * dis @ swapped.T, p3)
    return (l1 + l2 + l3) / 3


def contrastive_loss(img: torch.Tensor, txt: torch.Tensor, scale, positives: torch.Tensor | None = None) -> torch.Tensor:
    """CON1: symmetric CLIP InfoNCE on (B, D) image-caption pairs, targets arange(B); `positives`
    (B, B) bool, image i x caption j true (None = the standard loss)."""
    img, txt = F.normalize(img.float(), dim=-1), F.normalize(txt.float(), dim=-1)
    logits = scale * img @ txt.T
    return 0.5 * (_ce(logits, positives) + _ce(logits.T, None if positives is None else positives.T))


# ----------------------------------------------------------------------------- captions
def _stop(text: str, rng) -> str:
    """With or without a final full stop (prompts come both ways)."""
    text = text.rstrip(".")
    return text + "." if rng.random() < 0.5 else text


def affirmed_caption(f: str, rng) -> str:
    """An affirmed template of f: "f", "there is f", "f is present" (zero-shot positive templates)."""
    t = POSITIVE_TEMPLATES[rng.integers(len(POSITIVE_TEMPLATES))]
    return _stop(t.format(affirm(f)), rng)


def negated_caption(f: str, rng) -> str:
    """A clinical negation of f (`negate` with one of `NEGATION_TEMPLATES`)."""
    return _stop(negate(f, NEGATION_TEMPLATES[rng.integers(len(NEGATION_TEMPLATES))]), rng)


def holds(presence: dict, need: dict) -> bool:
    """Whether a caption with findings `need` ({finding: 1 affirmed / 0 negated}) is true of an image."""
    return all(presence.get(f, -1) == v for f, v in need.items())


def mixed_caption(f1: str, f2: str, rng) -> str:
    """f1 affirmed, f2 negated: "f1, but no f2" (clinical) or "this image features f1, but not f2" (NegBench)."""
    k = rng.integers(len(MIXED_TEMPLATES))
    neg = "not " + f2 if k == 1 else negate(f2, NEGATION_TEMPLATES[rng.integers(len(NEGATION_TEMPLATES))])
    return _stop(MIXED_TEMPLATES[k].format(affirm(f1), neg), rng)


@dataclass
class NegationBatch:
    """Indices into the image set and the captions of one batch (all lists of length B)."""

    images: np.ndarray          # anchors x_i
    distractors: np.ndarray     # d_i, same family, lacking the finding c_i affirms
    captions: list              # c_i, true of x_i
    negated: list               # n_i, false of x_i, true of d_i
    findings: list              # the finding each c_i affirms
    distractor_captions: list   # CON1: an independent true caption of d_i (report-like pool)
    caption_needs: list         # what c_i states: {finding: 1 affirmed / 0 negated}
    negated_needs: list
    distractor_needs: list

    def truth(self, presence: list[dict], loss: str = "con2") -> tuple:
        """Bool masks of which texts are true of which images, in the layout `con_clip_loss`
        (CON2) or `contrastive_loss` over [images; distractors] x [captions; distractor captions] (CON1)
        takes as `positives`. The diagonals are always set."""
        def mask(imgs, needs):
            return torch.tensor([[holds(presence[i], n) for n in needs] for i in imgs])

        if loss == "con1":
            imgs = list(self.images) + list(self.distractors)
            return mask(imgs, self.caption_needs + self.distractor_needs)
        texts = self.caption_needs + self.negated_needs
        return (mask(self.images, texts), mask(self.images, self.caption_needs).T,
                mask(self.distractors, self.negated_needs + self.caption_needs))


class NegationBatcher:
    """Samples CoN-CLIP batches from phantom presence dicts ({finding: 0/1} per image).

    Images whose dicts share the same finding names form a family; distractors come from the
    anchor's family. For an anchor with a present finding f: caption an affirmed template of f and
    negation "no f" (a clinical template), distractor an image without f. With probability `mixed_p`,
    when the anchor also lacks some f2: caption "f1, but no f2"; its negation swaps the roles,
    "f2, but no f1", and the distractor has f2 and lacks f1 (NegBench's hard case).
    """

    def __init__(self, presence: list[dict], mixed_p: float = 0.3, seed: int = 0):
        self.presence = [dict(p) for p in presence]
        self.mixed_p = float(mixed_p)
        self.rng = np.random.default_rng(seed)
        self.family = [tuple(sorted(p)) for p in self.presence]
        fams = sorted(set(self.family))
        self.members = {k: np.array([i for i, f in enumerate(self.family) if f == k]) for k in fams}
        self.anchors = np.array([i for i, p in enumerate(self.presence) if any(p.values())])
        if not len(self.anchors):
            raise ValueError("no image with a present finding: nothing to caption")
        # per family and finding: images with it / without it
        self.has, self.lacks = {}, {}
        for k, idx in self.members.items():
            for f in k:
                on = np.array([self.presence[i][f] for i in idx], bool)
                self.has[k, f], self.lacks[k, f] = idx[on], idx[~on]

    def _pick(self, arr):
        return int(arr[self.rng.integers(len(arr))])

    def true_caption(self, i: int) -> tuple[str, dict]:
        """A report-like true caption of image i, affirmed, negated or mixed (for CON1), and its findings."""
        p, rng = self.presence[i], self.rng
        pos = [f for f, v in p.items() if v]
        neg = [f for f, v in p.items() if not v]
        if pos and neg and rng.random() < self.mixed_p:
            f1, f2 = pos[rng.integers(len(pos))], neg[rng.integers(len(neg))]
            return mixed_caption(f1, f2, rng), {f1: 1, f2: 0}
        if pos and (not neg or rng.random() < 0.5):
            f = pos[rng.integers(len(pos))]
            return affirmed_caption(f, rng), {f: 1}
        f = neg[rng.integers(len(neg))]
        return negated_caption(f, rng), {f: 0}

    def sample(self, batch: int) -> NegationBatch:
        rng = self.rng
        imgs, dis, caps, negs, fs, cneed, nneed = [], [], [], [], [], [], []
        for i in self.anchors[rng.integers(len(self.anchors), size=batch)]:
            i = int(i)
            k, p = self.family[i], self.presence[i]
            pos = [f for f in k if p[f]]
            absent = [f for f in k if not p[f]]
            f1 = pos[rng.integers(len(pos))]
            cap, neg, pool = None, None, self.lacks[k, f1]
            if absent and rng.random() < self.mixed_p:
                f2 = absent[rng.integers(len(absent))]
                both = np.intersect1d(self.has[k, f2], self.lacks[k, f1], assume_unique=True)
                if len(both):
                    cap, neg, pool = mixed_caption(f1, f2, rng), mixed_caption(f2, f1, rng), both
                    cn, nn = {f1: 1, f2: 0}, {f2: 1, f1: 0}
            if cap is None:
                if not len(pool):   # every image of the family has f1: no distractor to contrast with
                    continue
                cap, neg, cn, nn = affirmed_caption(f1, rng), negated_caption(f1, rng), {f1: 1}, {f1: 0}
            imgs.append(i)
            dis.append(self._pick(pool))
            caps.append(cap)
            negs.append(neg)
            fs.append(f1)
            cneed.append(cn)
            nneed.append(nn)
        if not imgs:
            raise ValueError("no anchor has a distractor: every image of a family has the same findings")
        dcap = [self.true_caption(d) for d in dis]
        return NegationBatch(np.array(imgs), np.array(dis), caps, negs, fs, [c for c, _ in dcap], cneed, nneed,
                             [n for _, n in dcap])
