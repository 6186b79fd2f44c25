"""DICOM study batch inference (`clinlens batch`): discover series in a folder or on a DICOMweb server,
run text-prompted segmentation, concept classification and explanation heatmaps on each series once,
write DICOM SEG / parametric maps / TID 1500 SR + JSON, resumably, on a local process pool or Ray.

Modules: `discover` (scan, group, validate), `process` (the pure per-series function), `outputs`
(DICOM/JSON writers and checks), `executors` (local, Ray), `run` (orchestration, reports), `cli`.
"""
