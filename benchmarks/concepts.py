"""CSR on held-out phantoms (methods.md §2 metrics): class macro-F1 against a linear probe and a
concept-bottleneck baseline on the same patch features (the CSR model's backbone), and the pointing game of the concept
maps against the finding masks (and, as the paper defines it, their boxes), before and after atlas pruning.

Atlas pruning is simulated as a clinician would do it from the atlas: a prototype whose nearest
training patch (among the training images labelled with its concept, `build_atlas`) does not touch its concept's mask in that training image is removed (a concept keeps
at least its best prototype), then the task head is refitted. Families with masks: derm (spatial
dermoscopic concepts) and chest (findings).

The correction loop (`--drawn`): CSR retrained as the shipped model is, with the phantoms' concept masks
standing in for the regions a clinician draws and names after a concept, on a share of the training
images (the shipped models have them on all); the same metrics. Share 1 is the shipped training itself: when the
shipped file's training record says so, it is evaluated instead of retrained (retraining it reproduced it exactly).
`--jobs N` retrains the arms in N processes. Writes benchmarks/results/concepts.md and .json.
"""
from __future__ import annotations

import argparse
import functools
import multiprocessing
import sys
import tempfile
from concurrent.futures import Future, ProcessPoolExecutor
from pathlib import Path

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import f1_score

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, header, write_results  # noqa: E402

from clinlens.data.phantoms import make_chest, make_derm, mask_box  # noqa: E402
from clinlens.models.clip import load_clip  # noqa: E402
from clinlens.models.csr import CSRModel  # noqa: E402
from clinlens.trainers.concepts import (CSR_FAMILIES, SHIPPED, _features, _tensors, csr_file,  # noqa: E402
                                       phantom_concept_items, shipped_training_record, train_csr)

MAKERS = {"derm": make_derm, "chest": make_chest}


@functools.lru_cache(maxsize=None)  # each evaluation reads every held-out image's masks several times
def masks_of(item_id: str, size: int) -> dict:
    fam, seed = item_id.split("_phantom_")
    return MAKERS[fam](int(seed), size=size).masks


def cell_box(flat: int, grid, S: int):
    h, w = grid
    r, c = divmod(int(flat), w)
    return int(c * S / w), int(r * S / h), int(np.ceil((c + 1) * S / w)), int(np.ceil((r + 1) * S / h))


def hits(box, mask) -> bool:
    x0, y0, x1, y1 = box
    return bool(mask[y0:y1, x0:x1].any())


def centre_in_box(cell, box) -> bool:
    """The paper's pointing hit (methods.md §2): the map's maximum, here the peak patch's centre, inside the box."""
    cx, cy = (cell[0] + cell[2]) / 2, (cell[1] + cell[3]) / 2
    return bool(box) and box[0] <= cx < box[2] and box[1] <= cy < box[3]


def pointing_game(model: CSRModel, feats, items, size: int) -> dict:
    """Pointing over (image, present concept with a mask): `mask` = share whose concept map's peak patch
    touches the mask, `box` = share whose peak patch centre falls inside the mask's bounding box (the
    paper's definition), `n` = their count, `per` = per concept [mask hits, objects, summed mask area share]."""
    with torch.no_grad():
        maps = model.similarity_maps(feats.to(model.device)).flatten(2).cpu()  # (N, P, hw)
    n = hit = box_hit = 0
    per = {}
    for i, it in enumerate(items):
        masks = masks_of(it[0], size)
        for k, name in enumerate(model.concepts):
            cols = (model.proto_concept == k).nonzero().flatten()
            if name not in masks or not it[2].get(name) or not len(cols):
                continue
            best = maps[i, cols].max(0).values  # the concept map: best prototype per patch
            cell = cell_box(best.argmax(), model.grid, size)
            ok = hits(cell, masks[name])
            n += 1
            hit += ok
            box_hit += centre_in_box(cell, mask_box(masks[name]))
            c = per.setdefault(name, [0, 0, 0.0])
            c[0] += ok
            c[1] += 1
            c[2] += float(np.mean(masks[name]))
    return {"mask": hit / max(n, 1), "box": box_hit / max(n, 1), "n": n, "per": per}


def probe_pointing(model: CSRModel, ftr, rtr, fte, items, size: int) -> float:
    """Reference for what the frozen features allow: per concept, a logistic regression on single patch features
    fitted to tell the training patches its drawn regions touch from all others; pointing (mask) of its peak
    patch on the held-out images, over the same objects as `pointing_game`."""
    cov = model.region_weights(rtr).flatten(2).cpu() > 0  # (N, K, hw)
    d = ftr.shape[1]
    xtr = ftr.flatten(2).transpose(1, 2).reshape(-1, d).numpy()
    xte = fte.flatten(2).transpose(1, 2).numpy()  # (n, hw, D)
    clf = {k: LogisticRegression(max_iter=2000).fit(xtr, cov[:, k].reshape(-1).numpy())
           for k in range(len(model.concepts)) if cov[:, k].any()}
    n = hit = 0
    for i, it in enumerate(items):
        masks = masks_of(it[0], size)
        for k, name in enumerate(model.concepts):
            if name not in masks or not it[2].get(name) or not (model.proto_concept == k).any():
                continue
            n += 1
            if k in clf:
                hit += hits(cell_box(int(clf[k].decision_function(xte[i]).argmax()), model.grid, size), masks[name])
    return hit / max(n, 1)


def prune_ids(model: CSRModel, size: int) -> list[int]:
    """Prototypes whose atlas patch misses their concept's mask (a concept keeps its best prototype)."""
    bad, by_concept = [], {}
    f = size / model.image_size  # atlas boxes are on the model input
    for e in model.atlas:
        masks = masks_of(e["image_id"], size)
        x0, y0, x1, y1 = e["box"]
        box = (int(x0 * f), int(y0 * f), int(np.ceil(x1 * f)), int(np.ceil(y1 * f)))
        ok = e["concept"] in masks and hits(box, masks[e["concept"]])
        by_concept.setdefault(e["concept"], []).append((ok, e["similarity"], e["prototype_id"]))
    for concept, entries in by_concept.items():
        if not any(ok for ok, _, _ in entries):
            entries = sorted(entries, key=lambda t: -t[1])[1:]  # keep the most similar one
        bad += [pid for ok, _, pid in entries if not ok]
    return sorted(bad)


def macro_f1(y, pred) -> float:
    return float(f1_score(y, pred, average="macro"))


def with_drawn(items, share: float, seed: int = 0) -> list:
    """Items from `phantom_concept_items(..., drawn=True)` keeping their drawn regions (the masks of their
    present concepts) on a `share` of the images, drawn at random: what a clinician's drawn and named
    segments give the train task."""
    rng = np.random.default_rng([seed, int(round(share * 1000))])
    return [(*it[:4], it[4] if rng.random() < share else {}) for it in items]


def evaluate(model: CSRModel, ftr, ytr, fte, yte, test, size: int) -> dict:
    """F1 and pointing before and after atlas pruning (the model is pruned in place)."""
    row = {}
    with torch.no_grad():
        row["csr_f1"] = macro_f1(yte, model(features=fte)["logits"].argmax(-1).cpu())
    pg = pointing_game(model, fte, test, size)
    row.update(pointing_before=pg["mask"], pointing_box_before=pg["box"], pointing_n=pg["n"],
               per_concept_before=pg["per"])
    ids = prune_ids(model, size)
    kept = model.prune_prototypes(ids)
    with torch.no_grad():
        scores = model.scores_from_maps(model.similarity_maps(ftr.to(model.device))).cpu()
    model.refit_task_head(scores, ytr)
    with torch.no_grad():
        row["csr_f1_pruned"] = macro_f1(yte, model(features=fte)["logits"].argmax(-1).cpu())
    pg = pointing_game(model, fte, test, size)
    row.update(pointing_after=pg["mask"], pointing_box_after=pg["box"], per_concept_after=pg["per"])
    row["pruned"] = len(ids)
    row["prototypes"] = int(len(kept) + len(ids))
    return row


def retrain(model_dir, fam: str, n_train: int, size: int, share: float, path, threads: int) -> dict:
    """One correction-loop arm: the shipped training with the concept regions drawn on a `share` of the images
    (a process of its own under `--jobs`)."""
    torch.set_num_threads(threads)
    bundle = load_clip(model_dir, device="cpu")
    concepts, classes = CSR_FAMILIES[fam]
    items = with_drawn(phantom_concept_items(fam, 0, n_train, size, drawn=True), share)
    return train_csr(bundle, items, path, concepts, classes, progress=False, log=lambda *_: None,
                     **SHIPPED.get(fam, {}))


def run_family(bundle, fam: str, n_train: int, n_test: int, size: int, arms: dict) -> dict:
    """The shipped model's row and its drawn-share arms (share -> (model path, future of its training summary))."""
    concepts, classes = CSR_FAMILIES[fam]
    model = CSRModel.load(bundle, csr_file(bundle.path, fam))
    train = phantom_concept_items(fam, 0, n_train, size, drawn=True)  # the shipped model's training items
    test = phantom_concept_items(fam, 9, n_test, size)     # held out (other seeds)
    ftr, ytr_c, ytr, rtr = _tensors(bundle, model, train)
    fte, yte_c, yte, _ = _tensors(bundle, model, test)
    with torch.no_grad():
        out_te = model(features=fte)
        out_tr = model(features=ftr)
    row = {"train": len(train), "test": len(test), "classes": classes,
           "finetuned": bool(model.config["finetune_backbone"]), "input_size": model.image_size}
    pool = lambda f: f.mean((2, 3)).numpy()  # noqa: E731
    probe = LogisticRegression(max_iter=3000).fit(pool(ftr), ytr)
    row["probe_f1"] = macro_f1(yte, probe.predict(pool(fte)))
    cb = LogisticRegression(max_iter=3000).fit(torch.sigmoid(out_tr["concept_logits"]).numpy(), ytr)
    row["bottleneck_f1"] = macro_f1(yte, cb.predict(torch.sigmoid(out_te["concept_logits"]).numpy()))
    row["probe_pointing"] = probe_pointing(model, ftr, rtr, fte, test, size)
    row.update(evaluate(model, ftr, ytr, fte, yte, test, size))
    print(f"[{fam}] shipped model: macro-F1 {row['csr_f1']:.3f}, pointing after pruning {row['pointing_after']:.3f}; "
          f"{len(arms)} drawn-share arm(s) to go", flush=True)
    # the correction loop: the same training, with the concept regions drawn on a share of the images
    row["drawn"] = {}
    for share, (path, fut) in arms.items():
        summ = fut.result()
        m = CSRModel.load(bundle, path)
        reused = path == csr_file(bundle.path, fam)
        if m.config["finetune_backbone"] and not reused:  # its own tower: its own features
            a_tr, a_te = _features(bundle, m, train), _features(bundle, m, test)
        else:
            a_tr, a_te = ftr, fte
        r = evaluate(m, a_tr, ytr, a_te, yte, test, size)
        r["drawn_regions"] = summ["drawn_regions"]
        r["reused_shipped"] = reused
        row["drawn"][str(share)] = r
        how = "the shipped training" if r["reused_shipped"] else f"trained in {summ['seconds']}s"
        print(f"[{fam}] drawn share {share}: {how}, macro-F1 {r['csr_f1']:.3f}, "
              f"pointing after pruning {r['pointing_after']:.3f}", flush=True)
    return row


def pointing_verdict(after: dict) -> str:
    """'**met**', '**missed**' or '**met for X only**' for pointing >= 0.8, with the figures."""
    hit = [f for f, v in after.items() if v >= 0.8]
    word = "met" if len(hit) == len(after) else "missed" if not hit else f"met for {', '.join(hit)} only"
    return f"**{word}** (" + ", ".join(f"{f} {v:.3f}" for f, v in after.items()) + ")"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="HF CLIP dir with csr_<family>.safetensors (default: embedded)")
    ap.add_argument("--n-train", type=int, default=240)
    ap.add_argument("--n-test", type=int, default=150)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--drawn", type=float, nargs="*", default=[0.0, 0.25, 1.0],
                    help="shares of the training images with their concept regions drawn (retrained arms)")
    ap.add_argument("--jobs", type=int, default=1,
                    help="processes retraining the drawn-share arms (each with --threads threads) while this one "
                         "evaluates")
    ap.add_argument("--out", default=str(RESULTS / "concepts"))
    a = ap.parse_args(argv)
    if a.jobs < 1:
        ap.error(f"--jobs must be at least 1, got {a.jobs}")
    torch.set_num_threads(a.threads)
    bundle = load_clip(a.model, device="cpu")
    fams = ("derm", "chest")
    with tempfile.TemporaryDirectory() as tmp, ProcessPoolExecutor(
            a.jobs, mp_context=multiprocessing.get_context("spawn")) as ex:
        arms = {fam: {} for fam in fams}
        for fam in fams:
            rec = shipped_training_record(bundle.path, fam, a.n_train)
            for share in a.drawn:
                if share >= 1.0 and rec is not None:
                    done = Future()
                    done.set_result(rec)
                    arms[fam][share] = (csr_file(bundle.path, fam), done)
                else:
                    path = Path(tmp) / f"csr_{fam}_{share}.safetensors"
                    arms[fam][share] = (path, ex.submit(retrain, bundle.path, fam, a.n_train, a.size, share, path,
                                                        a.threads))
        rows = {fam: run_family(bundle, fam, a.n_train, a.n_test, a.size, arms[fam]) for fam in fams}
    tuned = [f for f in fams if rows[f]["finetuned"]]
    lines = [header("Concept-similarity classification (CSR) on held-out phantoms"),
             f"- model: `{bundle.path}` (shipped `csr_<family>.safetensors`, trained by `clinlens train-default "
             f"--concepts-only` on {a.n_train} phantoms, seed 0, with their concept masks as drawn regions); held-out: "
             f"{a.n_test} phantoms of other seeds, {a.size} px.",
             "- model input per family (`SHIPPED` in clinlens/trainers/concepts.py, chosen on validation phantoms): "
             + ", ".join(f"{f} {r['input_size']} px" for f, r in rows.items())
             + " (16 px patches; a larger input interpolates the CLIP's position embeddings). Every feature below "
             "(CSR, baselines, probe) is the CSR model's backbone's at the family's input: the CLIP's, frozen"
             + (f"; for {', '.join(tuned)} the model's own fine-tuned copy of the vision tower (each retrained arm "
                "its own)" if tuned else "") + ".",
             "- baselines on the same patch features: linear probe = logistic regression on the "
             "mean-pooled patch features; concept bottleneck = logistic regression on CSR's stage-1 concept "
             "probabilities.",
             "- pointing game: for each held-out image and present concept with a mask, the peak patch of the "
             "concept map (max over its prototypes) must touch the mask (*mask*); *box* = the paper's definition "
             "(methods.md §2: the map's maximum inside the ground-truth box): the peak patch's centre inside the "
             "mask's bounding box. Pruning: prototypes whose atlas patch "
             "(the nearest patch among the training images labelled with the prototype's concept) misses the "
             "concept's mask in that image are removed, then the head is refitted.",
             "- patch-probe pointing (a reference, not a method): per concept, a logistic regression on single "
             "frozen patch features fitted to the patches the training images' concept masks touch; pointing (mask) "
             "of its peak patch on the same held-out objects: roughly what a linear read-out of these features "
             "can point to.", "",
             "| family | classes | CSR macro-F1 | linear probe | concept bottleneck | CSR after pruning | "
             "pointing before, mask / box | pointing after, mask / box | pruned / prototypes | pointed objects | "
             "patch-probe pointing (reference) |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for fam, r in rows.items():
        lines.append(f"| {fam} | {len(r['classes'])} | {r['csr_f1']:.3f} | {r['probe_f1']:.3f} | "
                     f"{r['bottleneck_f1']:.3f} | {r['csr_f1_pruned']:.3f} | {r['pointing_before']:.3f} / "
                     f"{r['pointing_box_before']:.3f} | {r['pointing_after']:.3f} / {r['pointing_box_after']:.3f} | "
                     f"{r['pruned']} / {r['prototypes']} | {r['pointing_n']} | {r['probe_pointing']:.3f} |")
    lines += ["", "Pointing per concept, shipped models (mask area = mean share of the image the concept's mask covers):",
              "", "| family | concept | objects | mask area | pointing before | pointing after |", "|---|---|---|---|---|---|"]
    for fam, r in rows.items():
        for name, (hb, nb, area) in r["per_concept_before"].items():
            ha = r["per_concept_after"][name][0]
            lines.append(f"| {fam} | {name} | {nb} | {area / nb:.3f} | {hb / nb:.3f} | {ha / nb:.3f} |")
    if any(r["drawn"] for r in rows.values()):
        lines += ["", "### The correction loop: the same training with the concept regions drawn",
                  "",
                  "The `concepts` train task uses a region a clinician drew and named after a concept as that "
                  "concept's local vector (stage 2) instead of the CAM estimate. Here the phantoms' concept masks "
                  "play the drawn segments on a share of the training images (drawn at random; all the present "
                  "concepts with a mask on those images), and CSR is retrained exactly as `clinlens train-default "
                  "--concepts-only` trains the shipped model (same images, seed and steps; share 1 is that training "
                  "again, share 0 the image-level labels alone). Same held-out images and metrics. Share 1 is "
                  "not retrained when the shipped file's training record is that training (*shipped* below: its "
                  "row repeats the shipped model's; an earlier run that retrained it reproduced it exactly).", "",
                  "| family | drawn share | drawn regions | CSR macro-F1 | CSR after pruning | pointing before, mask / box | "
                  "pointing after, mask / box | pruned / prototypes |", "|---|---|---|---|---|---|---|---|"]
        for fam, r in rows.items():
            for share, x in r["drawn"].items():
                lines.append(f"| {fam} | {float(share):.2f}{' (shipped)' if x.get('reused_shipped') else ''} | "
                             f"{x['drawn_regions']} | {x['csr_f1']:.3f} | "
                             f"{x['csr_f1_pruned']:.3f} | {x['pointing_before']:.3f} / {x['pointing_box_before']:.3f} | "
                             f"{x['pointing_after']:.3f} / {x['pointing_box_after']:.3f} | "
                             f"{x['pruned']} / {x['prototypes']} |")
    lines.append("")
    for key, what in (("pointing_after", "mask"), ("pointing_box_after", "box, the paper's definition")):
        shipped = {f: r[key] for f, r in rows.items()}
        lines.append(f"Target pointing game >= 0.8 after pruning ({what}), shipped models: {pointing_verdict(shipped)}.")
        for share in (a.drawn or [])[-1:]:
            drawn = {f: r["drawn"][str(share)][key] for f, r in rows.items()}
            lines.append(f"With the concept regions drawn on a share {share:.2f} of the training images: "
                         f"{pointing_verdict(drawn)}.")
    lines.append("")
    write_results(a.out, lines, rows)


if __name__ == "__main__":
    main()
