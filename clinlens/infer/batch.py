"""`/batch/infer/<model>` for clinlens tasks.

MONAI Label 0.8.5 builds its device list from the CUDA devices when `multi_gpu` is true (the
endpoint's default), so on a CPU-only host the list is empty and every batch run fails with
ZeroDivisionError. Without CUDA this task runs on the CPU instead. Label-less results are kept by
`clinlens.infer.datastore.save_result` (wired in the app's `infer`).
"""
from __future__ import annotations

import torch
from monailabel.interfaces.tasks.batch_infer import BatchInferTask


class ClinlensBatchInfer(BatchInferTask):
    def __call__(self, request, datastore, infer):
        request = dict(request)
        if not torch.cuda.is_available():
            request["multi_gpu"] = False
            request["device"] = "cpu"
        return super().__call__(request, datastore, infer)
