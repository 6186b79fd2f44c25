"""`region_seg` MONAI Label train task: a thin adapter over `train_region`.

Learns from the datastore's `final` labels: every segment of a multi-label map is one object,
named by the label's `label_info` (what Slicer's Save Label sends) or the app's label table.
Continues from the current region model and publishes atomically, so inference hot-reloads it.
Runs in MONAI Label's training subprocess; progress goes to a stats file the server reads. With
more than one GPU and `multi_gpu` (default on), it trains on all of them with DDP
(`train_region_ddp`, MONAI Label's spawn-one-process-per-GPU pattern).
"""
from __future__ import annotations

import time
from pathlib import Path

import torch

from clinlens.data.conventions import RequestError, choice_option, number_option
from clinlens.models.clip import load_clip
from clinlens.models.region_clip import region_path
from clinlens.trainers.region_seg import label_examples, train_region, train_region_ddp
from clinlens.trainers.task import StatsTrainTask


def label_names(info: dict | None, fallback: dict) -> dict:
    """{name: index} of one saved label: its `label_info` if it has one, else the app's labels."""
    items = (info or {}).get("label_info") or []
    names = {str(d["name"]): int(d["idx"]) for d in items if isinstance(d, dict) and "name" in d and "idx" in d}
    return names or dict(fallback)


class RegionSegTrain(StatsTrainTask):
    def __init__(self, clip, publish_path: str | Path, labels: dict, description="Train the region model from final labels"):
        super().__init__(description, Path(publish_path).with_suffix(".train_stats.json"))
        self.clip = clip
        self.publish_path = Path(publish_path)
        self.labels = dict(labels)

    def config(self):
        return {"steps": 200, "batch": 8, "lr": 5e-4, "device": "cuda" if torch.cuda.is_available() else "cpu",
                "multi_gpu": True}

    def parse(self, request: dict) -> dict:
        """The request's options, checked before any work (the server calls it before starting training)."""
        conf = self.options(request)
        device = str(choice_option(conf, "device", self.config()["device"]))
        if not (device == "cpu" or device.startswith("cuda")):
            raise RequestError(f"'device' must be cpu or cuda[:N], got {device!r}")
        if device.startswith("cuda") and not torch.cuda.is_available():
            raise RequestError("'device' cuda: this server has no GPU (use cpu)")
        return {"steps": number_option(conf, "steps", 200, int, 1), "batch": number_option(conf, "batch", 8, int, 1),
                "lr": number_option(conf, "lr", 5e-4, float, 0, 1), "device": device,
                "multi_gpu": str(conf["multi_gpu"]).lower() == "true"}

    def __call__(self, request, datastore):
        conf = self.parse(request)
        ids = datastore.get_labeled_images()
        if not ids:
            raise ValueError("no final labels in the datastore to train region_seg from")
        examples = []
        for i in ids:
            names = label_names(datastore.get_label_info(i, "final"), self.labels)
            examples += list(label_examples([datastore.get_image_uri(i)], [datastore.get_label_uri(i, "final")], names))
        init = self.publish_path if self.publish_path.is_file() else region_path(self.clip.path)
        start = time.time()
        self.write_stats(status="RUNNING", start_ts=int(start), total_time="0s", images=len(ids), objects=len(examples))
        kw = dict(steps=conf["steps"], batch=conf["batch"], lr=conf["lr"],
                  init=init if init.is_file() else None, progress=True,
                  extra={"source": "datastore final labels", "images": len(ids)})
        gpus = torch.cuda.device_count() if str(conf["device"]).startswith("cuda") else 0
        if gpus > 1 and conf["multi_gpu"]:
            summary = train_region_ddp(self.clip.path, examples, self.publish_path, world_size=gpus, backend="nccl", **kw)
        else:
            summary = train_region(load_clip(self.clip.path, device=conf["device"]), examples, self.publish_path, **kw)
        self.write_stats(status="DONE", start_ts=int(start), total_time=f"{time.time() - start:.0f}s", images=len(ids),
                          objects=len(examples), steps=summary["steps"], train_dice=summary.get("final_dice"))
        return summary
