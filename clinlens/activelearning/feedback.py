"""Clinician feedback that flows back into training: segment names and structured feedback.

- `map_segments`: Slicer's Save Label names its segments (`label_info`); each name is mapped onto
  a finding or concept of the vocabulary through the report parser (`clinlens.text.negation`:
  "Pleural_Effusion", "effusion" -> "pleural effusion"). A name that maps to nothing is kept
  under its own name and reported, never dropped.
- `validate_feedback`: what a labelmap cannot carry (rejected concepts, focus/exclude boxes with
  polarity, a corrected class, pruned prototypes), checked against a schema. A bad payload raises
  `RequestError` (4xx) before anything is stored.
- `merge_feedback`: the stored feedback of an image after a new payload (sets grow, boxes append,
  the corrected class is replaced).
Feedback lives in the image info under `FEEDBACK_KEY`; the train tasks read it from there.
"""
from __future__ import annotations

from typing import Iterable, Sequence

from clinlens.data.conventions import RequestError, name_list, parse_box

FEEDBACK_KEY = "feedback"
SEGMENTS_KEY = "segments"
FIELDS = ("reject_concepts", "boxes", "corrected_class", "pruned_prototypes")


def canonical_name(name: str, vocabulary: Sequence[str]) -> str | None:
    """The vocabulary entry a segment name means, or None (unknown, or several findings in one name)."""
    from clinlens.text.negation import split_findings

    text = " ".join(str(name).replace("_", " ").replace("-", " ").split())
    low = text.lower()
    if low in vocabulary:
        return low
    found = {f.name for f in split_findings(text, tuple(vocabulary)) if f.polarity > 0 and f.name in vocabulary}
    return found.pop() if len(found) == 1 else None


def map_segments(names: dict[int, str], vocabulary: Sequence[str]) -> dict:
    """{idx: name} of a saved labelmap -> {"segments": [{idx, name, maps_to}], "unknown": [names]}."""
    segs = [{"idx": int(i), "name": str(n), "maps_to": canonical_name(n, vocabulary)} for i, n in sorted(names.items())]
    return {"segments": segs, "unknown": [s["name"] for s in segs if s["maps_to"] is None]}


def validate_feedback(payload, concepts: Sequence[str], classes: Sequence[str], hw=None,
                      prototype_ids: Iterable[int] | None = None) -> dict:
    """The normalised feedback, or RequestError naming the first problem. `hw` bounds the boxes
    (None: not checked); `prototype_ids` are the ids the current model has (None: not checked)."""
    if not isinstance(payload, dict) or not payload:
        raise RequestError(f"feedback must be a non-empty JSON object with any of {list(FIELDS)}")
    extra = sorted(set(payload) - set(FIELDS))
    if extra:
        raise RequestError(f"unknown feedback field(s) {extra}; allowed: {list(FIELDS)}")
    out: dict = {}
    if "reject_concepts" in payload:
        out["reject_concepts"] = name_list(payload["reject_concepts"], "reject_concepts", concepts, "concept")
    if "boxes" in payload:
        if not isinstance(payload["boxes"], list):
            raise RequestError("feedback 'boxes' must be a list")
        out["boxes"] = [parse_box(b, hw) for b in payload["boxes"]]
    if "corrected_class" in payload:
        out["corrected_class"] = name_list(payload["corrected_class"], "corrected_class", classes, "class")[0]
    if "pruned_prototypes" in payload:
        out["pruned_prototypes"] = prototype_id_list(payload["pruned_prototypes"], "pruned_prototypes", prototype_ids)
    return out


def prototype_id_list(ids, field: str, prototype_ids: Iterable[int] | None = None) -> list[int]:
    """A list of integer prototype ids, each one the model has (`prototype_ids`; None: not checked) ->
    sorted unique ids, or a RequestError naming `field` and the ids that do not exist."""
    if not isinstance(ids, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
        raise RequestError(f"'{field}' must be a list of integer prototype ids, got {ids!r}")
    known = None if prototype_ids is None else {int(i) for i in prototype_ids}
    bad = sorted(i for i in ids if i < 0 or (known is not None and i not in known))
    if bad:
        raise RequestError(f"'{field}': prototype id(s) {bad} do not exist"
                           + (f" (the model has {len(known)} prototypes, ids {min(known)}..{max(known)})"
                              if known else ""))
    return sorted(set(ids))


def merge_feedback(old: dict | None, new: dict) -> dict:
    """Stored feedback after `new`: rejected concepts and pruned prototypes accumulate, boxes append."""
    out = dict(old or {})
    for key in ("reject_concepts", "pruned_prototypes"):
        if key in new:
            out[key] = sorted(set(out.get(key, [])) | set(new[key]))
    if "boxes" in new:
        out["boxes"] = list(out.get("boxes", [])) + list(new["boxes"])
    if "corrected_class" in new:
        out["corrected_class"] = new["corrected_class"]
    return out


def pruned_by_family(infos: Iterable[tuple[str, dict]]) -> dict[str, list[int]]:
    """{family: prototype ids} pruned in the feedback of (family, image info) pairs."""
    out: dict[str, set] = {}
    for fam, info in infos:
        ids = ((info or {}).get(FEEDBACK_KEY) or {}).get("pruned_prototypes") or []
        if ids:
            out.setdefault(fam, set()).update(int(i) for i in ids)
    return {f: sorted(v) for f, v in out.items()}


def feedback_checker(csr):
    """(image_id, image_uri, payload) -> normalised feedback, against the image's family vocabulary,
    its size (boxes) and the prototype ids of its current CSR model (`LazyCSR`)."""
    from clinlens.infer.base import ClinlensInfer, family_of
    from clinlens.trainers.concepts import CSR_FAMILIES
    from clinlens.trainers.concepts_task import family_concepts

    def check(image_id: str, uri: str, payload) -> dict:
        image = ClinlensInfer.images.get(uri)
        fam = family_of(image)
        concepts, classes = family_concepts(csr, fam), CSR_FAMILIES[fam][1]  # concepts added by text count
        ids = None
        if isinstance(payload, dict) and "pruned_prototypes" in payload:
            try:
                ids = csr.get(fam).proto_ids.tolist()
            except Exception as e:  # noqa: BLE001 (no model yet): say so instead of guessing
                raise RequestError(f"cannot check prototype ids: no {fam} concept model ({e})") from e
        return validate_feedback(payload, concepts, classes, hw=image.spatial_shape[-2:], prototype_ids=ids)

    return check
