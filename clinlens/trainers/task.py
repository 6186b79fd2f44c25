"""Shared plumbing of clinlens's MONAI Label train tasks: request options merged over the task's
config, and progress in a JSON file that the server reads for `/info` `train_stats` (training runs
in MONAI Label's subprocess, so the file is the only channel back)."""
from __future__ import annotations

import json
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
