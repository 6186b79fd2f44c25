"""`clinlens batch`: the command-line face of `clinlens.batch.run.run_batch`.

    clinlens batch SOURCE -o OUT [selection] [tasks] [executor] [--stow]

SOURCE is a folder of DICOM files (any nesting) or a DICOMweb URL (e.g. Orthanc's
``http://host:8042/dicom-web``). `add_parser(subparsers)` registers the sub-command; `run(args)`
returns the exit code: 0 all series done (or already complete), 1 something failed (see
``OUT/errors.json``), 2 a usage error.
"""
from __future__ import annotations

import argparse
import sys

from clinlens.batch.process import TASKS


def _tasks(text: str) -> tuple:
    items = tuple(t.strip() for t in text.split(",") if t.strip())
    bad = [t for t in items if t not in TASKS]
    if bad or not items:
        raise argparse.ArgumentTypeError(f"unknown task(s) {bad or text!r}; choose from {','.join(TASKS)}")
    return items


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "batch", help="run segmentation / classification / explanation over DICOM series (folder or DICOMweb)",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("source", help="folder of DICOM files (any nesting) or a DICOMweb URL (http[s]://.../dicom-web)")
    p.add_argument("-o", "--out", required=True, help="output folder (per-series outputs, summary.csv, errors.json)")
    sel = p.add_argument_group("selection (all given conditions must hold)")
    sel.add_argument("--study", action="append", default=[], metavar="UID", help="StudyInstanceUID (repeatable)")
    sel.add_argument("--series", action="append", default=[], metavar="UID", help="SeriesInstanceUID (repeatable)")
    sel.add_argument("--series-file", metavar="PATH",
                     help="file of SeriesInstanceUIDs: one per line, or a CSV with a SeriesInstanceUID column")
    sel.add_argument("--modality", action="append", default=[], metavar="MOD", help="e.g. CT (repeatable)")
    t = p.add_argument_group("tasks")
    t.add_argument("--tasks", type=_tasks, default=TASKS, metavar="LIST",
                   help=f"comma-separated subset of {','.join(TASKS)} (default: all, each series loaded once)")
    t.add_argument("--prompt", action="append", default=[], metavar="TEXT",
                   help="text prompt to segment (repeatable; default: the CT findings)")
    t.add_argument("--prompts-file", metavar="JSON", help='JSON list of prompts (or {"prompts": [...]})')
    t.add_argument("--threshold", type=float, default=0.5, help="text-match probability a region must reach (0.5)")
    t.add_argument("--explain-target", action="append", default=[], metavar="TEXT",
                   help="what to explain (repeatable; default: the prompts, else the top class)")
    t.add_argument("--explain-method", default="medgrad", choices=["medgrad", "grad_eclip", "attention"],
                   help="heatmap method (medgrad)")
    t.add_argument("--explain-blocks", default=None, metavar="all|last|N",
                   help="vision blocks the heatmap sums: all (default for medgrad and grad_eclip: more faithful on "
                        "the phantoms), the last (the paper's; the default for attention), or the last N")
    t.add_argument("--explain-gradient", default=None, choices=["direct", "exact"],
                   help="the heatmap's channel weights: direct (along the residual stream, default for medgrad and "
                        "grad_eclip: all blocks for ~1.3x a forward) or exact (a backward through the blocks)")
    m = p.add_argument_group("models")
    m.add_argument("--clip-model", metavar="DIR", help="local HF CLIP dir (default: $CLINLENS_CLIP_MODEL or shipped)")
    m.add_argument("--model-dir", metavar="DIR", help="published region/CSR models (default: beside the CLIP)")
    m.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    e = p.add_argument_group("execution")
    e.add_argument("--executor", choices=["local", "ray"], default="local", help="local process pool or Ray actors")
    e.add_argument("--workers", type=int, default=2, help="processes / actors (local: 0 = in this process)")
    e.add_argument("--threads", type=int, default=1, help="torch threads per worker (1)")
    e.add_argument("--address", default=None, help="Ray cluster address (default: start a local Ray)")
    e.add_argument("--stow", action="store_true", help="STOW outputs to the DICOMweb source (or --stow-url)")
    e.add_argument("--stow-url", default=None, metavar="URL", help="DICOMweb server to STOW the outputs to")
    e.add_argument("--no-progress", action="store_true", help="no progress bar")
    e.add_argument("--keep-staging", action="store_true", help="keep per-series staging folders (debugging)")
    p.set_defaults(fn=run)   # clinlens/cli.py dispatches on `fn`
    return p


def run(args) -> int:
    from clinlens.batch.discover import Selection
    from clinlens.batch.process import BatchConfig
    from clinlens.batch.run import load_prompts_file, run_batch, validate_prompts

    try:
        prompts = list(args.prompt)
        if args.prompts_file:
            prompts += load_prompts_file(args.prompts_file)
        if prompts:
            validate_prompts(prompts)
        if args.executor == "local" and args.workers < 0 or args.executor == "ray" and args.workers < 1:
            raise ValueError(f"--workers {args.workers} is out of range")
        config = BatchConfig(out_dir=args.out, tasks=tuple(args.tasks), prompts=tuple(dict.fromkeys(prompts)),
                             threshold=args.threshold, explain_targets=tuple(args.explain_target),
                             explain_method=args.explain_method, explain_blocks=args.explain_blocks,
                             explain_gradient=args.explain_gradient,
                             clip_dir=args.clip_model, model_dir=args.model_dir,
                             device=args.device, threads=args.threads, keep_staging=args.keep_staging)
        selection = Selection.build(args.study, args.series, args.modality, args.series_file)
        if args.stow and not (args.stow_url or str(args.source).startswith(("http://", "https://"))):
            raise ValueError("--stow needs a DICOMweb source or --stow-url")
    except (ValueError, OSError) as e:
        print(f"clinlens batch: {e}", file=sys.stderr)
        return 2
    try:
        result = run_batch(args.source, args.out, config, selection, executor=args.executor, workers=args.workers,
                           address=args.address, threads=args.threads, stow=args.stow, stow_url=args.stow_url,
                           progress=not args.no_progress)
    except (FileNotFoundError, ValueError) as e:
        print(f"clinlens batch: {e}", file=sys.stderr)
        return 2
    c = result.counts
    print(f"clinlens batch: {c.get('ok', 0)} done, {c.get('skipped', 0)} already complete, {c.get('failed', 0)} failed "
          f"series; {c.get('errors', 0)} error(s) in {args.out}/errors.json; summary {args.out}/summary.csv "
          f"({result.seconds:.1f} s)", file=sys.stderr)
    for err in result.errors[:10]:
        what = err.series_uid or err.file
        print(f"  {err.kind}: {what}: {err.reason}", file=sys.stderr)
    if len(result.errors) > 10:
        print(f"  ... {len(result.errors) - 10} more", file=sys.stderr)
    return result.exit_code


def main(argv=None) -> int:
    """`python -m clinlens.batch.cli ...` until the lead hooks `add_parser` into `clinlens/cli.py`."""
    parser = argparse.ArgumentParser(prog="clinlens")
    sub = parser.add_subparsers(dest="command", required=True)
    add_parser(sub)
    args = parser.parse_args(["batch", *(argv if argv is not None else sys.argv[1:])])
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(main())
