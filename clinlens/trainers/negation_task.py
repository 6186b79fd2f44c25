"""`negation` MONAI Label train task: a thin adapter over `train_negation`.

Fine-tunes the text tower of the current CLIP (a `LazyClip`'s directory) on phantom images with
negated captions and distractor images (CON2, the CoN-CLIP loss, or CON1; methods.md §5) and
publishes the tuned CLIP, a complete HF directory, atomically to the output directory given at
construction. The datastore is not read: the captions come from phantoms with known findings.
"""
from __future__ import annotations

import time
from pathlib import Path

from clinlens.data.conventions import RequestError, number_option
from clinlens.trainers.negation import DEFAULTS, LOSSES, train_negation
from clinlens.trainers.task import StatsTrainTask


class NegationTrain(StatsTrainTask):
    def __init__(self, clip, out_dir, description="Fine-tune the CLIP text encoder on negated captions (CoN-CLIP)"):
        """`clip`: a `clinlens.models.clip.LazyClip` (the base); `out_dir`: where the tuned CLIP is published."""
        self.out_dir = Path(out_dir)
        super().__init__(description, self.out_dir.parent / f"{self.out_dir.name}.train_stats.json")
        self.clip = clip

    def config(self):
        return {"loss": DEFAULTS["loss"], "steps": DEFAULTS["steps"], "n_images": DEFAULTS["n_images"],
                "batch": DEFAULTS["batch"], "lr": DEFAULTS["lr"], "seed": DEFAULTS["seed"]}

    def parse(self, request: dict) -> dict:
        """The request's options, checked before any work (the server calls it before starting training)."""
        conf = self.options(request)
        loss = str(conf["loss"]).strip().lower()
        if loss not in LOSSES:
            raise RequestError(f"'loss' must be one of {list(LOSSES)}, got {conf['loss']!r}")
        return {"loss": loss, "steps": number_option(conf, "steps", DEFAULTS["steps"], int, 1, 100_000),
                "n_images": number_option(conf, "n_images", DEFAULTS["n_images"], int, 8, 60_000),
                "batch": number_option(conf, "batch", DEFAULTS["batch"], int, 2, 4096),
                "lr": number_option(conf, "lr", DEFAULTS["lr"], float, 1e-8, 1.0),
                "seed": number_option(conf, "seed", DEFAULTS["seed"], int, 0, 139)}

    def __call__(self, request, datastore=None):
        conf = self.parse(request)
        loss, steps, n_images, batch, lr, seed = (conf[k] for k in ("loss", "steps", "n_images", "batch", "lr", "seed"))
        base = self.clip.path
        start = time.time()
        self.write_stats(status="RUNNING", start_ts=int(start), total_time="0s", loss=loss, steps=steps,
                         n_images=n_images, base=str(base))
        try:
            summary = train_negation(base, self.out_dir, loss=loss, steps=steps, batch=batch, lr=lr,
                                     n_images=n_images, seed=seed, progress=True)
        except Exception as e:
            self.write_stats(status="FAILED", start_ts=int(start), total_time=f"{time.time() - start:.0f}s",
                             loss=loss, error=str(e))
            raise
        self.write_stats(status="DONE", start_ts=int(start), total_time=f"{time.time() - start:.0f}s", loss=loss,
                         steps=steps, n_images=n_images, base=str(base), out_dir=str(self.out_dir),
                         final_loss=summary["final_loss"])
        return summary
