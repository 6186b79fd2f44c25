"""Shared plumbing of clinlens's MONAI Label train tasks: request options merged over the task's
config, and progress in a JSON file that the server reads for `/info` `train_stats` (training runs
in MONAI Label's subprocess, so the file is the only channel back). While a run trains, the file
carries `epoch`/`total_epochs` (the keys Slicer's progress bar reads) and no `total_time`; a run
that raises leaves FAILED and its error, not the last run's DONE."""
from __future__ import annotations

import json
import time
from pathlib import Path

from monailabel.interfaces.tasks.train import TrainTask

from clinlens.models.checkpoint import atomic_write


class StatsTrainTask(TrainTask):
    def __init__(self, description: str, stats_path):
        super().__init__(description)
        self.stats_path = Path(stats_path)

    def options(self, request: dict) -> dict:
        """The task's config with the request's values for its keys."""
        conf = self.config()
        return {**conf, **{k: v for k, v in request.items() if k in conf}}

    def stats(self):
        try:
            return json.loads(self.stats_path.read_text())
        except (OSError, ValueError):
            return {}

    def write_stats(self, **kw):
        atomic_write(self.stats_path, lambda t: Path(t).write_text(json.dumps(kw)))

    def step_reporter(self, start: float, total: int, interval: float = 2.0, **fixed):
        """`on_step(step, loss)` writing RUNNING stats at the first and last step and at most every `interval` s."""
        last = [0.0]

        def report(step: int, loss: float):
            now = time.time()
            if step in (1, total) or now - last[0] >= interval:
                last[0] = now
                self.write_stats(status="RUNNING", start_ts=int(start), epoch=step, total_epochs=total,
                                 loss=round(float(loss), 4), **fixed)
        return report

    def run_reporting(self, fn, *args):
        """`fn(start, *args)`; RUNNING stats first, FAILED with the error if it raises."""
        start = time.time()
        self.write_stats(status="RUNNING", start_ts=int(start), epoch=0, total_epochs=1)
        try:
            return fn(start, *args)
        except Exception as e:
            self.write_stats(status="FAILED", start_ts=int(start), total_time=f"{time.time() - start:.0f}s", error=str(e))
            raise
