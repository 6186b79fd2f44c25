"""The `clinlens` command: serve, demo, make-data, train-default, train-negation, batch, prune-prototypes."""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

DEFAULT_STUDIES = "studies"


def _conf_pairs(pairs) -> dict:
    return {k: v for k, v in (pairs or [])}


def _ensure_studies(path: str, seed: int = 0) -> None:
    from clinlens.data.studies import make_studies

    if path.startswith(("http://", "https://")):
        return
    make_studies(path, seed=seed)  # a fast no-op when the folder is already complete


def cmd_make_data(a) -> int:
    from clinlens.data.studies import make_studies

    summary = make_studies(a.out, n_chest=a.n_chest, n_derm=a.n_derm, n_ct=a.n_ct,
                           labelled_fraction=a.labelled_fraction, seed=a.seed)
    print(f"studies ready in {a.out} ({len(summary['images'])} images)")
    return 0


def cmd_train_default(a) -> int:
    from clinlens.trainers.default_clip import DEFAULTS, train_default

    counts = dict(DEFAULTS["counts"])
    if a.scale != 1.0:
        counts = {k: max(2, int(v * a.scale)) for k, v in counts.items()}
    if a.families and (a.skip_concepts or a.region_only):
        print("--families names concept models; it cannot go with --skip-concepts or --region-only", file=sys.stderr)
        return 2
    only = a.region_only or a.concepts_only
    if not only:
        train_default(a.out, seed=a.seed, steps=a.steps, batch=a.batch, counts=counts, device=a.device)
    if not a.skip_region and not a.concepts_only:
        from clinlens.trainers.region_seg import train_region_default

        train_region_default(a.out, seed=a.seed, device=a.device)
    if not a.skip_concepts and not a.region_only:
        from clinlens.trainers.concepts import CSR_FAMILIES, DEFAULTS as CSR_DEFAULTS, train_concept_models_default

        from clinlens.trainers.prompt_learning import DEFAULTS as PROMPT_DEFAULTS

        scaled = lambda n, least: n if a.scale == 1.0 else max(least, int(n * a.scale))  # noqa: E731
        train_concept_models_default(a.out, families=tuple(a.families or CSR_FAMILIES), seed=a.seed,
                                     n_images=scaled(CSR_DEFAULTS["n_images"], 8),
                                     steps=scaled(CSR_DEFAULTS["steps"], 5),
                                     prompt_steps=scaled(PROMPT_DEFAULTS["steps"], 5), device=a.device)
    return 0


def cmd_prune(a) -> int:
    """Atlas pruning from the command line: drop prototypes by id from the model the server serves (the one
    published in `--model-dir`, else the shipped one), refit the head on phantoms, publish to `--model-dir`,
    where the running server picks it up. The shipped file beside the CLIP weights is never overwritten
    unless named with `--out`. A model trained on the datastore is refused: a phantom refit would undo its
    training (the train task's `prune` option refits it on the datastore)."""
    from clinlens.models.checkpoint import summary
    from clinlens.models.clip import load_clip
    from clinlens.models.csr import CSRModel
    from clinlens.server import APP_DIR
    from clinlens.trainers.concepts import CSR_FAMILIES, csr_file, phantom_concept_items, train_csr

    bundle = load_clip(a.clip, device=a.device)
    model_dir = Path(a.model_dir) if a.model_dir else APP_DIR / "model"
    served = csr_file(model_dir, a.family)
    src = Path(a.model) if a.model else (served if served.is_file() else csr_file(bundle.path, a.family))
    if not src.is_file():
        print(f"no {a.family} concept model at {src}", file=sys.stderr)
        return 2
    if (summary(src).get("training") or {}).get("source") == "datastore":
        print(f"{src} was trained on the datastore; this command refits its head on phantoms, which would undo "
              f"that. Prune it where it learned: POST /train/concepts with {{\"prune\": {{\"{a.family}\": "
              f"{sorted(set(a.ids))}}}}} (or the feedback's pruned_prototypes)", file=sys.stderr)
        return 2
    known = {int(i) for i in CSRModel.load(bundle, src).proto_ids.tolist()}
    missing = sorted(set(a.ids) - known)
    if missing:
        print(f"unknown prototype id(s) {missing} in {src}; it has {sorted(known)}", file=sys.stderr)
        return 2
    concepts, classes = CSR_FAMILIES[a.family]
    items = phantom_concept_items(a.family, a.seed, a.n_images)
    out = Path(a.out) if a.out else served
    out.parent.mkdir(parents=True, exist_ok=True)
    train_csr(bundle, items, out, concepts, classes, steps=0, init=src, prune=a.ids,
              extra={"command": "clinlens prune-prototypes", "family": a.family})
    return 0


def cmd_train_negation(a) -> int:
    """CoN-CLIP (or CON1) fine-tuning of the text tower; the served app picks up `--out` by itself."""
    from clinlens.models.clip import resolve_clip_dir
    from clinlens.trainers.negation import train_negation

    base = Path(a.clip) if a.clip else resolve_clip_dir()
    train_negation(base, Path(a.out), loss=a.loss, steps=a.steps, n_images=a.n_images, seed=a.seed, device=a.device)
    return 0


def banner(host: str, port: int, studies: str) -> str:
    url = f"http://{host}:{port}"
    return f"""
clinlens is starting on {url} over {studies}
  3D Slicer : install the MONAI Label extension, open its module, set server = {url},
              click the refresh button, pick an image ("Next Sample") and a model.
  OHIF      : {url}/ohif/ (needs a DICOMweb datastore: `./run.sh serve --orthanc` starts a local
              Orthanc with studies/dicom/* in it, or `--studies http://host:8042/dicom-web`).
  API       : {url}/docs   (GET /info/, POST /infer/<model>?image=<id>)
Stop with Ctrl-C.
"""


def _serve_with_orthanc(a) -> int:
    """Start a local Orthanc, load the studies' DICOM series into it, serve over its DICOMweb (for OHIF)."""
    import signal
    import subprocess

    from clinlens.orthanc import Orthanc
    from clinlens.server import server_command, server_env

    folder = Path(a.studies)
    files = sorted(folder.glob("dicom/*/*.dcm"))
    if not files:
        print(f"no DICOM series under {folder}/dicom to load into Orthanc", file=sys.stderr)
        return 2
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # stop the server and Orthanc on a plain kill too
    with Orthanc(Path(a.orthanc_dir), port=a.orthanc_port) as o:
        print(f"Orthanc on {o.url} (DICOMweb {o.dicomweb_url}); storing {len(files)} instances", flush=True)
        o.store(files)
        cmd = server_command(o.dicomweb_url, a.host, a.port, _conf_pairs(a.conf))
        print(banner(a.host, a.port, o.dicomweb_url), flush=True)
        try:
            return subprocess.call(cmd, env=server_env())
        except KeyboardInterrupt:
            return 0


def cmd_serve(a) -> int:
    from clinlens.server import server_command, server_env

    _ensure_studies(a.studies)
    if a.orthanc:
        return _serve_with_orthanc(a)
    cmd = server_command(a.studies if "://" in a.studies else os.path.abspath(a.studies), a.host, a.port,
                         _conf_pairs(a.conf))
    print(banner(a.host, a.port, a.studies), flush=True)
    # active-learning scores refresh in the background after start-up, training and each next sample
    env = server_env({"MONAI_LABEL_AUTO_UPDATE_SCORING": os.environ.get("MONAI_LABEL_AUTO_UPDATE_SCORING", "true")})
    os.execvpe(cmd[0], cmd, env)
    return 0


def cmd_demo(a) -> int:
    from clinlens.demo import run_demo

    _ensure_studies(a.studies)
    report = run_demo(a.studies, a.out, conf=_conf_pairs(a.conf))
    print(f"demo report: {report}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="clinlens", description=__doc__)
    sub = p.add_subparsers(dest="cmd", required=True)

    s = sub.add_parser("serve", help="generate studies if missing and start the MONAI Label server")
    s.add_argument("--studies", default=DEFAULT_STUDIES, help="studies folder or DICOMweb URL")
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=8000)
    s.add_argument("--conf", nargs=2, action="append", metavar=("KEY", "VALUE"),
                   help="app setting, e.g. --conf clip_model /path/to/hf-clip")
    s.add_argument("--orthanc", action="store_true",
                   help="start a local Orthanc (Debian orthanc + orthanc-dicomweb), load the studies' DICOM "
                        "series and serve over its DICOMweb, as OHIF needs")
    s.add_argument("--orthanc-port", type=int, default=8042)
    s.add_argument("--orthanc-dir", default="out/orthanc", help="Orthanc's storage and config")
    s.set_defaults(fn=cmd_serve)

    d = sub.add_parser("demo", help="replay a scripted clinician session over HTTP; write a report with overlays")
    d.add_argument("--studies", default=DEFAULT_STUDIES)
    d.add_argument("--out", default="out/demo")
    d.add_argument("--conf", nargs=2, action="append", metavar=("KEY", "VALUE"))
    d.set_defaults(fn=cmd_demo)

    m = sub.add_parser("make-data", help="write phantom studies as a MONAI Label studies folder")
    m.add_argument("--out", default=DEFAULT_STUDIES)
    m.add_argument("--n-chest", type=int, default=8)
    m.add_argument("--n-derm", type=int, default=6)
    m.add_argument("--n-ct", type=int, default=3)
    m.add_argument("--labelled-fraction", type=float, default=0.5)
    m.add_argument("--seed", type=int, default=0)
    m.set_defaults(fn=cmd_make_data)

    t = sub.add_parser("train-default", help="train the embedded default CLIP and its region model on phantoms "
                                             "(reproducible from --seed)")
    from clinlens.models.clip import DEFAULT_CLIP_DIR
    from clinlens.trainers.default_clip import DEFAULTS

    t.add_argument("--out", default=str(DEFAULT_CLIP_DIR))
    t.add_argument("--seed", type=int, default=DEFAULTS["seed"])
    t.add_argument("--steps", type=int, default=DEFAULTS["steps"])
    t.add_argument("--batch", type=int, default=DEFAULTS["batch"])
    t.add_argument("--scale", type=float, default=1.0, help="scale the number of phantoms (and the concept models' steps; e.g. 0.05 for a smoke run)")
    t.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    t.add_argument("--skip-region", action="store_true", help="train only the CLIP, not the region model")
    t.add_argument("--region-only", action="store_true", help="train only the region model on the existing CLIP")
    t.add_argument("--skip-concepts", action="store_true", help="do not train the concept (CSR) models and prompt learners")
    t.add_argument("--concepts-only", action="store_true", help="train only the concept (CSR) models and prompt learners")
    from clinlens.trainers.concepts import CSR_FAMILIES

    t.add_argument("--families", nargs="+", choices=list(CSR_FAMILIES), default=None,
                   help="concept models and prompt learners of these families only (default: all)")
    t.set_defaults(fn=cmd_train_default)

    from clinlens.trainers.negation import DEFAULTS as NEG, LOSSES

    ng = sub.add_parser("train-negation", help="fine-tune the CLIP text encoder on negated captions and distractor "
                                               "images (CoN-CLIP loss, image encoder frozen)")
    ng.add_argument("--loss", choices=LOSSES, default=NEG["loss"], help="con2 = CoN-CLIP, con1 = plain contrastive")
    ng.add_argument("--clip", default=None, help="base CLIP directory (default: the configured/embedded one)")
    ng.add_argument("--out", default=str(Path(__file__).resolve().parent.parent / "monailabel_app" / "model" / "clip_negation"),
                    help="where the tuned CLIP is published (default: the app's model dir, where the server loads "
                         "its text tower from)")
    ng.add_argument("--steps", type=int, default=NEG["steps"])
    ng.add_argument("--n-images", type=int, default=NEG["n_images"])
    ng.add_argument("--seed", type=int, default=NEG["seed"])
    ng.add_argument("--device", default=None)
    ng.set_defaults(fn=cmd_train_negation)

    from clinlens.batch.cli import add_parser as add_batch

    add_batch(sub)

    pr = sub.add_parser("prune-prototypes", help="remove CSR prototypes by id and refit the task head (atlas pruning)")
    pr.add_argument("--family", required=True, choices=["derm", "chest", "ct"])
    pr.add_argument("--ids", type=int, nargs="+", required=True, help="prototype ids (see the atlas in csr_<family>.json)")
    pr.add_argument("--clip", default=None, help="CLIP directory (default: the embedded default)")
    pr.add_argument("--model-dir", default=None,
                    help="the server's model_dir (default: monailabel_app/model, the server's own default)")
    pr.add_argument("--model", default=None, help="CSR file to prune (default: the one the server serves: "
                    "csr_<family>.safetensors in --model-dir, else the shipped one beside the CLIP weights)")
    pr.add_argument("--out", default=None, help="where to publish (default: csr_<family>.safetensors in --model-dir)")
    pr.add_argument("--n-images", type=int, default=120, help="phantoms to refit the head on")
    pr.add_argument("--seed", type=int, default=0)
    pr.add_argument("--device", default=None)
    pr.set_defaults(fn=cmd_prune)
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(main())
