"""Where the per-series function runs: in this process, in a local process pool, or on Ray actors.

Every executor maps `clinlens.batch.process.process_series` over series specs and yields result rows
as they finish (any order). The models load once per worker, before its first series:

- `LocalExecutor(workers=0)`: in this process (debugging, tests).
- `LocalExecutor(workers=N)`: a `ProcessPoolExecutor` of N spawned processes; each loads the models
  in its initializer and keeps them for every series it gets. A worker that dies fails the series it
  held (a row, not an exception).
- `RayExecutor(workers=N, address=...)`: N actors (`SeriesWorker`), each loading the models in its
  constructor. An actor asks for one CPU and, when
  `ray.cluster_resources()` lists GPUs, ``num_gpus=1`` (a fair fraction when there are fewer GPUs
  than actors) and then runs on CUDA. Series go to whichever actor is idle (`ray.wait`); an actor
  that dies fails only the series it held. With no `address` it joins the Ray already initialised in
  this process or starts a local one.
"""
from __future__ import annotations

import dataclasses
import multiprocessing as mp
import os
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from typing import Iterable, Iterator

from clinlens.batch.discover import PROCESSING_FAILED, SeriesSpec
from clinlens.batch.process import BatchConfig, base_row, get_models, process_series


def _set_threads(threads: int) -> None:
    import torch

    torch.set_num_threads(max(1, int(threads)))


def _worker_env() -> None:
    """Offline, and no per-worker weight-loading bars under the batch's own progress bar."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    except Exception:  # noqa: BLE001 (cosmetic only)
        pass


def _failed(spec: SeriesSpec, reason: str) -> dict:
    row = base_row(spec)
    row.update(status="failed", kind=PROCESSING_FAILED, reason=reason[:500], stage="process")
    return row


# ----------------------------------------------------------------------------- local
_WORKER: dict = {}


def _init_worker(config: BatchConfig, threads: int) -> None:
    _worker_env()
    _set_threads(threads)
    _WORKER["config"] = config
    _WORKER["models"] = get_models(config).warm()


def _work(spec: SeriesSpec) -> dict:
    return process_series(spec, _WORKER["config"], _WORKER["models"])


class LocalExecutor:
    name = "local"

    def __init__(self, config: BatchConfig, workers: int = 2, threads: int | None = None):
        self.config, self.workers = config, max(0, int(workers))
        self.threads = int(threads or config.threads or 1)

    def describe(self) -> dict:
        return {"executor": self.name, "workers": self.workers or 1, "in_process": self.workers == 0,
                "threads_per_worker": self.threads}

    def map(self, specs: Iterable[SeriesSpec]) -> Iterator[dict]:
        specs = list(specs)
        if not specs:
            return
        if self.workers == 0:
            import torch

            before = torch.get_num_threads()
            _set_threads(self.threads)
            try:
                models = get_models(self.config).warm()
                for s in specs:
                    yield process_series(s, self.config, models)
            finally:
                torch.set_num_threads(before)
            return
        ctx = mp.get_context("spawn")  # torch + fork is unsafe once the parent has used threads
        with ProcessPoolExecutor(max_workers=min(self.workers, len(specs)), mp_context=ctx,
                                 initializer=_init_worker, initargs=(self.config, self.threads)) as pool:
            pending = {pool.submit(_work, s): s for s in specs}
            while pending:
                done, _ = wait(pending, return_when=FIRST_COMPLETED)
                for f in done:
                    spec = pending.pop(f)
                    try:
                        yield f.result()
                    except Exception as e:  # noqa: BLE001 (a dead worker: BrokenProcessPool etc.)
                        yield _failed(spec, f"worker failed: {type(e).__name__}: {e}")


# ----------------------------------------------------------------------------- Ray
class SeriesWorker:
    """A Ray actor body: the models load once here, then `process` runs the per-series function."""

    def __init__(self, config: BatchConfig, threads: int = 1, use_gpu: bool = False):
        _worker_env()
        _set_threads(threads)
        if use_gpu:
            config = dataclasses.replace(config, device="cuda")
        elif config.device is None:
            config = dataclasses.replace(config, device="cpu")
        self.config = config
        self.models = get_models(config).warm()
        self.pid = os.getpid()

    def info(self) -> dict:
        return {"pid": self.pid, "device": self.models.device}

    def process(self, spec: SeriesSpec) -> dict:
        row = process_series(spec, self.config, self.models)
        row["worker"] = self.pid
        return row


def gpu_share(cluster_gpus: float, workers: int) -> float:
    """GPUs each actor asks for: 1 when there are enough, a fair fraction when fewer, 0 without."""
    if cluster_gpus <= 0:
        return 0.0
    return 1.0 if cluster_gpus >= workers else round(cluster_gpus / workers, 4)


class RayExecutor:
    name = "ray"

    def __init__(self, config: BatchConfig, workers: int = 2, address: str | None = None,
                 threads: int | None = None, num_gpus: float | None = None):
        self.config, self.workers, self.address = config, max(1, int(workers)), address
        self.threads = int(threads or config.threads or 1)
        self.num_gpus = num_gpus
        self.actors_info: list = []
        self._started_ray = False

    def describe(self) -> dict:
        return {"executor": self.name, "workers": self.workers, "address": self.address or "local",
                "threads_per_worker": self.threads, "num_gpus_per_worker": self.num_gpus,
                "actors": self.actors_info}

    def _connect(self):
        import ray

        if not ray.is_initialized():
            if self.address:
                ray.init(address=self.address, log_to_driver=False)
            else:
                ray.init(num_cpus=max(self.workers * self.threads, 1), include_dashboard=False, log_to_driver=False)
            self._started_ray = True
        return ray

    def map(self, specs: Iterable[SeriesSpec]) -> Iterator[dict]:
        specs = list(specs)
        if not specs:
            return
        ray = self._connect()
        gpus = float(ray.cluster_resources().get("GPU", 0))
        if self.num_gpus is None:
            self.num_gpus = gpu_share(gpus, self.workers)
        actor_cls = ray.remote(num_cpus=self.threads, num_gpus=self.num_gpus)(SeriesWorker)
        n = min(self.workers, len(specs))
        actors = [actor_cls.remote(self.config, self.threads, self.num_gpus > 0) for _ in range(n)]
        try:
            self.actors_info = ray.get([a.info.remote() for a in actors])
            idle, queue, inflight = list(actors), list(specs), {}
            while queue or inflight:
                while idle and queue:
                    actor, spec = idle.pop(), queue.pop(0)
                    inflight[actor.process.remote(spec)] = (actor, spec)
                if not inflight:   # every actor died: what is left fails
                    for spec in queue:
                        yield _failed(spec, "no Ray worker left")
                    return
                (ref,), _ = ray.wait(list(inflight), num_returns=1)
                actor, spec = inflight.pop(ref)
                try:
                    row = ray.get(ref)
                except ray.exceptions.RayActorError as e:   # the actor died with this series
                    yield _failed(spec, f"ray worker died: {e}")
                    continue
                except Exception as e:  # noqa: BLE001
                    row = _failed(spec, f"ray task failed: {type(e).__name__}: {e}")
                idle.append(actor)
                yield row
        finally:
            for a in actors:
                try:
                    ray.kill(a)
                except Exception:  # noqa: BLE001
                    pass
            if self._started_ray:
                ray.shutdown()
                self._started_ray = False


def make_executor(kind: str, config: BatchConfig, workers: int = 2, address: str | None = None,
                  threads: int | None = None):
    if kind == "local":
        return LocalExecutor(config, workers, threads)
    if kind == "ray":
        return RayExecutor(config, workers, address, threads)
    raise ValueError(f"unknown executor {kind!r}; choose local or ray")
