"""Negation cues and scope (methods.md §5): reports, prompts, captions and the phantom reports."""
import json
import re

import pytest

from clinlens.data import phantoms as P
from clinlens.text.negation import (NEGATION_TEMPLATES, Finding, affirm, negate, parse_prompt, polarity_of,
                                    report_polarities, split_findings)

CHEST = P.CHEST_FINDINGS + ["pneumonia"]


def pol(text, vocab=CHEST):
    """Only the mentioned names: {name: +1 / -1}."""
    return {k: v for k, v in report_polarities(text, vocab).items() if v}


def triples(text):
    """Without vocabulary: [(phrase, polarity, cue)]."""
    return [(f.name, f.polarity, f.cue) for f in split_findings(text)]


# ----------------------------------------------------------------------------- report sentences
@pytest.mark.parametrize("text, expected", [
    ("No pleural effusion.", {"pleural effusion": -1}),
    ("Cardiomegaly, but no effusion.", {"cardiomegaly": 1, "pleural effusion": -1}),
    ("There is no pneumothorax or consolidation.", {"pneumothorax": -1, "consolidation": -1}),
    ("Effusion is absent.", {"pleural effusion": -1}),
    ("Negative for mass.", {"mass": -1}),
    ("Lungs are free of nodules.", {"nodule": -1}),
    ("Pneumonia has been ruled out.", {"pneumonia": -1}),
    ("Consolidation without effusion.", {"consolidation": 1, "pleural effusion": -1}),
    ("No nodule; small mass in the right lobe.", {"nodule": -1, "mass": 1}),
    ("Not consistent with pneumothorax.", {"pneumothorax": -1}),
    ("The heart is enlarged. No focal consolidation, effusion, or pneumothorax.",
     {"cardiomegaly": 1, "consolidation": -1, "pleural effusion": -1, "pneumothorax": -1}),
    ("Pneumothorax: negative.", {"pneumothorax": -1}),
    ("Nodule not seen.", {"nodule": -1}),
    ("Pulmonary nodules are not identified.", {"nodule": -1}),
    ("Effusion is no longer seen.", {"pleural effusion": -1}),
    ("Pleural effusion: none.", {"pleural effusion": -1}),
    ("Absence of pneumothorax.", {"pneumothorax": -1}),
    ("Neither effusion nor pneumothorax.", {"pleural effusion": -1, "pneumothorax": -1}),
    ("No nodule, mass, or consolidation.", {"nodule": -1, "mass": -1, "consolidation": -1}),
    ("No evidence of pneumothorax, pleural effusion or focal consolidation.",
     {"pneumothorax": -1, "pleural effusion": -1, "consolidation": -1}),
    # scope ends at clause boundaries
    ("No pneumothorax. However, there is a small effusion.", {"pneumothorax": -1, "pleural effusion": 1}),
    ("No effusion, although a nodule is present.", {"pleural effusion": -1, "nodule": 1}),
    ("No effusion or pneumothorax, with stable cardiomegaly.",
     {"pleural effusion": -1, "pneumothorax": -1, "cardiomegaly": 1}),
    ("No pleural effusion and the heart is enlarged.", {"pleural effusion": -1, "cardiomegaly": 1}),
    ("Mass in the left lobe; pneumothorax is absent.", {"mass": 1, "pneumothorax": -1}),
    ("Cardiomegaly but the effusion is absent.", {"cardiomegaly": 1, "pleural effusion": -1}),
    ("Lungs are otherwise unremarkable without mass.", {"mass": -1}),
    # pseudo-negations negate nothing
    ("Pneumothorax cannot be excluded.", {"pneumothorax": 1}),
    ("Pneumonia is not ruled out.", {"pneumonia": 1}),
    ("No change in the nodule.", {"nodule": 1}),
    ("No interval increase in the pleural effusion.", {"pleural effusion": 1}),
    # absence stated without a cue word, and its denial
    ("Heart size is normal.", {"cardiomegaly": -1}),
    ("Normal cardiac silhouette.", {"cardiomegaly": -1}),
    ("The heart is not enlarged.", {"cardiomegaly": -1}),
    ("Pleural effusion has resolved.", {"pleural effusion": -1}),
    # decimals do not split sentences; case does not matter
    ("A 2.3 cm mass. No effusion.", {"mass": 1, "pleural effusion": -1}),
    ("NO PLEURAL EFFUSION OR PNEUMOTHORAX.", {"pleural effusion": -1, "pneumothorax": -1}),
    ("Impression: pneumothorax.", {"pneumothorax": 1}),
    ("- no effusion\n- small nodule", {"pleural effusion": -1, "nodule": 1}),
    ("Lungs are clear.", {}),
])
def test_report_sentences_with_vocabulary(text, expected):
    assert pol(text) == expected


def test_multi_sentence_report_with_ct_vocabulary():
    text = "Well-circumscribed 16 mm nodule in the left upper lobe. No evidence of lung mass. No pleural effusion."
    fs = split_findings(text, P.CT_FINDINGS)
    assert [(f.name, f.polarity, f.cue, f.sentence) for f in fs] == [
        ("lung nodule", 1, None, 0), ("lung mass", -1, "no evidence of", 1), ("pleural effusion", -1, "no", 2)]
    assert [f.text for f in fs] == ["nodule", "lung mass", "pleural effusion"]
    for f in fs:
        assert isinstance(f, Finding) and text[f.span[0]:f.span[1]] == f.text


def test_post_cues_are_canonical_and_negate_backwards():
    fs = split_findings("Pneumonia has been ruled out. Effusion is absent. Nodule not seen.")
    assert [(f.name, f.polarity, f.cue, f.sentence) for f in fs] == [
        ("pneumonia", -1, "ruled out", 0), ("effusion", -1, "absent", 1), ("nodule", -1, "not seen", 2)]


def test_without_vocabulary_returns_phrases_in_scope():
    assert triples("There is no pneumothorax or consolidation.") == [
        ("pneumothorax", -1, "no"), ("consolidation", -1, "no")]
    assert triples("Cardiomegaly, but no effusion.") == [("cardiomegaly", 1, None), ("effusion", -1, "no")]
    assert triples("Consolidation without effusion.") == [("consolidation", 1, None), ("effusion", -1, "without")]
    assert triples("No nodule; small mass in the right lobe.") == [
        ("nodule", -1, "no"), ("small mass in the right lobe", 1, None)]
    assert triples("The heart is enlarged. No focal consolidation, effusion, or pneumothorax.") == [
        ("heart is enlarged", 1, None), ("focal consolidation", -1, "no"), ("effusion", -1, "no"),
        ("pneumothorax", -1, "no")]
    assert triples("Lungs are free of nodules.")[-1] == ("nodules", -1, "free of")
    assert triples("Not consistent with pneumothorax.") == [("pneumothorax", -1, "not")]
    assert triples("Findings: none.") == [] and split_findings("") == [] and split_findings("  ") == []


# ----------------------------------------------------------------------------- vocabulary mapping
def test_vocabulary_plural_synonym_and_head_tolerance():
    assert polarity_of("No effusions.", "effusion") == -1
    assert polarity_of("No pleural effusion.", "effusion") == -1            # vocab name inside a longer mention
    assert polarity_of("No effusion.", "pleural effusion") == -1            # head noun -> the only "... effusion"
    assert polarity_of("Bilateral pleural effusions.", "pleural effusion") == 1
    assert polarity_of("No pneumothoraces.", "pneumothorax") == -1
    assert polarity_of("Two pulmonary nodules.", "lung nodule") == 1
    assert polarity_of("Small nodular opacity in the left upper lobe.", "nodule") == 1
    assert polarity_of("Large masses.", "lung mass") == 1
    assert polarity_of("No blue white veil.", "blue-white veil") == -1
    assert polarity_of("Lesion with streak.", "streaks") == 1
    assert polarity_of("Cardiomegaly.", "pleural effusion") == 0
    assert polarity_of("Massive effusion.", "mass") == 0                    # whole words only
    # an ambiguous head noun is not guessed; a quality modifier is never dropped
    assert split_findings("No effusion.", ["pleural effusion", "pericardial effusion"]) == []
    assert polarity_of("The border is blurred.", "irregular border") == 0
    assert pol("Symmetric lesion with a smooth, well-defined outline.", P.DERM_CONCEPTS) == {
        "asymmetry": -1, "irregular border": -1}
    assert pol("Asymmetric lesion with dots and globules and streaks. No pigment network.", P.DERM_CONCEPTS) == {
        "asymmetry": 1, "dots and globules": 1, "streaks": 1, "pigment network": -1}
    assert split_findings("No effusion.", "pleural effusion")[0].name == "pleural effusion"   # a str vocab


def test_affirmed_mention_wins_over_negated_one():
    text = "No effusion on the left. Small right pleural effusion."
    assert [f.polarity for f in split_findings(text, ["pleural effusion"])] == [-1, 1]
    assert polarity_of(text, "pleural effusion") == 1


# ----------------------------------------------------------------------------- prompts and captions
@pytest.mark.parametrize("prompt, expected", [
    ("no effusion", ("effusion", -1)),
    ("without pleural effusion", ("pleural effusion", -1)),
    ("free of pneumothorax", ("pneumothorax", -1)),
    ("nodule", ("nodule", 1)),
    ("Nodule.", ("nodule", 1)),
    ("no evidence of lung mass", ("lung mass", -1)),
    ("effusion is absent", ("effusion", -1)),
    ("negative for mass", ("mass", -1)),
    ("pneumothorax: negative", ("pneumothorax", -1)),
    ("pneumonia has been ruled out", ("pneumonia", -1)),
    ("there is pleural effusion.", ("pleural effusion", 1)),
    ("pleural effusion is present.", ("pleural effusion", 1)),
    ("no effusion or pneumothorax", ("effusion or pneumothorax", -1)),
    ("dots and globules", ("dots and globules", 1)),
    ("nodule in the left upper lobe", ("nodule in the left upper lobe", 1)),
    ("a chest x-ray showing no effusion", ("effusion", -1)),
    ("a photo of a nodule", ("nodule", 1)),
    # NegBench templates
    ("This image features nodule and mass", ("nodule and mass", 1)),
    ("this image does not feature effusion", ("effusion", -1)),
])
def test_parse_prompt(prompt, expected):
    assert parse_prompt(prompt) == expected


def test_parse_prompt_agrees_with_the_report_parser():
    for p in ["no effusion", "effusion is absent", "pneumothorax: negative", "cardiomegaly", "without mass",
              "not consistent with pneumothorax"]:
        text, polarity = parse_prompt(p)
        fs = split_findings(p)
        assert polarity == fs[0].polarity and text == fs[0].name


def test_parse_prompt_rejects_empty_and_mixed_prompts():
    for bad in ["", "   ", "No.", "features cardiomegaly, but not effusion"]:
        with pytest.raises(ValueError):
            parse_prompt(bad)
    # the mixed NegBench / clinical templates are split by split_findings
    assert triples("features cardiomegaly, but not effusion") == [("cardiomegaly", 1, None), ("effusion", -1, "not")]
    assert triples("nodule, but no mass") == [("nodule", 1, None), ("mass", -1, "no")]


def test_negate_and_affirm_captions():
    assert negate("pleural effusion") == "no pleural effusion"
    assert negate("A pleural effusion") == "no pleural effusion"
    assert negate("dots and globules") == "no dots and globules"
    assert negate("no effusion") == "effusion"                              # double negation affirms
    assert affirm("pleural effusion") == "pleural effusion"
    for finding in P.CHEST_FINDINGS + P.CT_FINDINGS + P.DERM_CONCEPTS:
        assert parse_prompt(finding) == (finding, 1)
        for t in NEGATION_TEMPLATES:                                        # every template round-trips
            caption = negate(finding, t)
            assert parse_prompt(caption) == (finding, -1), caption
            assert polarity_of(caption, finding) == -1
        assert polarity_of(f"{finding}, but no pneumonia", finding) == 1
        assert polarity_of(f"pneumonia, but no {finding}", finding) == -1


# ----------------------------------------------------------------------------- phantom reports
VOCAB = {"chest": P.CHEST_FINDINGS, "ct": P.CT_FINDINGS, "derm": P.DERM_CONCEPTS}
# absence stated without naming the finding (phantoms.py wording)
IMPLIED = {"cardiomegaly": r"heart size is normal|normal cardiac silhouette", "asymmetry": r"\bsymmetric",
           "irregular border": r"well-defined outline|sharply demarcated margins"}


def expected_polarities(report, concepts):
    low = report.lower()
    mentioned = {f: P.REPORT_TERMS[f] in low or bool(re.search(IMPLIED.get(f, "^$"), low)) for f in concepts}
    return {f: 1 if v else (-1 if mentioned[f] else 0) for f, v in concepts.items()}


@pytest.mark.parametrize("fam", ["chest", "ct", "derm"])
def test_phantom_reports_parse_to_ground_truth(fam):
    kw = {"chest": dict(size=96, shortcut=False), "ct": dict(shape=(16, 48, 48)), "derm": dict(size=64)}[fam]
    seen = {1: 0, -1: 0}
    for seed in range(40):
        s = P.make_sample(fam, 9000 + seed, **kw)
        got = report_polarities(s.report, VOCAB[fam])
        assert got == expected_polarities(s.report, s.concepts), s.report
        for v in got.values():
            seen[v] = seen.get(v, 0) + 1
    assert seen[1] >= 10 and seen[-1] >= 10          # both polarities really exercised


def test_study_json_reports_parse_to_ground_truth(tmp_path):
    from clinlens.data.studies import make_studies

    idx = make_studies(tmp_path, n_chest=10, n_derm=10, n_ct=10, chest_size=128, derm_size=64,
                       ct_shape=(16, 48, 48), dicom=False, progress=False, seed=3)
    assert len(idx["images"]) == 30
    for im in idx["images"]:
        rec = json.loads((tmp_path / "clinlens" / f"{im['id']}.json").read_text())
        got = report_polarities(rec["report"], VOCAB[rec["family"]])
        assert got == expected_polarities(rec["report"], rec["concepts"]), rec["report"]
        assert {f for f, v in got.items() if v == 1} == {f for f, v in rec["concepts"].items() if v}
