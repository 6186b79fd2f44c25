"""Negation cues with scope, for zero-shot prompts, report sentences and training captions.

methods.md §5 (negation in medical CLIP). One NegEx-style analyser serves all three uses:

- text -> sentences ("." "!" "?" followed by a space, blank lines, bullets; "2.3 cm" stays whole)
  -> clauses (";", ":", "but", "however", "although", "except", ", the ...", ...);
- a pre-position cue ("no", "not", "without", "negative for", "free of", "absence of",
  "no evidence of", "neither") negates forward to the clause end, the next cue, or a "with"
  that follows a negated phrase ("no effusion, with stable cardiomegaly");
- a post-position cue ("is absent", "not seen", "has been ruled out", "excluded", "has resolved",
  "pneumothorax: negative") negates back to the clause start;
- pseudo-cues ("no change in", "not ruled out", "cannot be excluded") negate nothing.

Mentions are then matched against a vocabulary (case, plural, hyphen, lung/pulmonary and head-noun
tolerant: "effusions" -> "pleural effusion") or, without one, cut into coordinated noun phrases
("no nodule, mass, or consolidation" -> three negated phrases).
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache

AFFIRMED, NEGATED = 1, -1
# Clinical negation templates of methods.md §5; the first is the canonical one.
NEGATION_TEMPLATES = ("no {}", "no evidence of {}", "{} is absent", "without {}")


@dataclass(frozen=True)
class Finding:
    """One mention: `text` as written at `span` (character offsets into the input), `name`
    normalised (the vocabulary entry, or the lower-case phrase), `polarity` +1 affirmed / -1
    negated, the canonical `cue` that negates it (None if affirmed), 0-based `sentence` index."""

    text: str
    name: str
    polarity: int
    cue: str | None
    sentence: int
    span: tuple[int, int]


# ----------------------------------------------------------------------------- cues
_B, _E = r"(?<![\w-])", r"(?![\w-])"
_AUX = r"(?:is|are|was|were|has been|have been|had been)"
_SEEN = r"(?:seen|identified|present|visuali[sz]ed|detected|demonstrated|appreciated|evident|visible|observed|noted)"
_PSEUDO = [  # look like negation, negate nothing (double negation / "no change in" a present finding)
    r"not (?:been |be )?(?:ruled out|excluded)", r"can ?not (?:be )?(?:ruled out|excluded)",
    r"can ?not (?:rule out|exclude)", r"no (?:significant |interval |suspicious )?(?:change|increase|decrease|"
    r"worsening|progression|growth)", r"without (?:interval )?change", r"not only", r"gram[- ]negative",
]
_POST = [rf"{_AUX} (?:now |also )?(?:ruled out|excluded|absent|negative)", rf"no longer {_SEEN}",
         r"(?:has|have) (?:now |since )?resolved"]
_PRE_MULTI = [
    r"no (?:(?:radiographic|definite|convincing|other|further) )?(?:evidence|signs?|findings?) "
    r"(?:of|for|to suggest|suggestive of)", r"negative for", r"free of", r"absence of", r"resolution of",
    r"ruled out for",
]
# post-position when text precedes them in the clause ("effusion absent"), else pre ("absent effusion")
_DUAL = [rf"not {_SEEN}", r"ruled out", r"excluded", r"absent", r"negative", r"none", r"resolved"]
_PRE_SINGLE = [r"neither", r"without", r"no", r"not"]
_CUE = re.compile(
    "|".join(f"(?P<{k}>{_B}(?:{'|'.join(v)}){_E})" for k, v in
             (("pseudo", _PSEUDO), ("post", _POST), ("pre", _PRE_MULTI), ("dual", _DUAL), ("pre1", _PRE_SINGLE))))
_BOUNDARY = re.compile(
    rf"[;:]|{_B}(?:but|however|although|though|whereas|except|aside from|apart from|which|yet|nevertheless){_E}"
    rf"|(?:,\s*)?{_B}and(?=\s+(?:there|the|it|this|these|they){_E})|,(?=\s*(?:there|the|it|this|these|they){_E})")
_WITH = re.compile(rf"{_B}with{_E}")
_WITH_OK = re.compile(rf"{_B}(?:consistent|compatible|keeping|associated|along)\s+$")  # "consistent with" continues
_HEADER = re.compile(r"\s*(?:impression|findings?|conclusions?|history|indications?|comparison|technique|summary|"
                     r"opinion|results?|report|diagnosis)\s*:")
_SENT_END = re.compile(r"[.!?]+(?=\s|$)|\n\s*\n|\n(?=\s*(?:[-*\u2022]|\d+[.)])\s)")

# Function words trimmed off phrases; a span with nothing else has no content.
_FILL = (r"the|a|an|any|some|there|here|is|are|was|were|be|been|has|have|had|of|for|to|in|on|at|also|this|that|"
         r"these|those|which|does|do|did|feature|features|featuring|show|shows|showing|shown|demonstrates?|"
         r"demonstrating|reveals?|revealing|evidence|signs?|findings?|definite|convincing|radiographic|further|"
         r"otherwise|seen|identified|noted|consistent|compatible|keeping|with|suggestive|suggests?|suggesting")
_LEAD = re.compile(rf"(?:[\s,.;:!?()\"'*\u2022-]|{_B}(?:{_FILL}){_E})+")
_TRAIL = re.compile(
    rf"(?:[\s,.;:!?()\"'*\u2022-]|{_B}(?:is|are|was|were|be|been|has|have|{_SEEN}|here|now|today|again){_E})+$")
_CONJ = re.compile(rf"\s*(?:,|\(|\)|/|{_B}(?:and/or|or|and|nor|as well as|along with|"
                   rf"(?:consistent|compatible|in keeping|associated) with|with){_E})\s*")
_PROMPT_PREFIX = re.compile(
    r"\s*(?:(?:an?|the|this|that)\s+)?(?:(?:chest|frontal|lateral|medical|skin|dermoscop(?:y|ic)|ct|axial)\s+)*"
    r"(?:x-ray|xray|radiograph|image|photo(?:graph)?|picture|scan|ct|slice|study)(?![\w-])\s*"
    r"(?:(?:of|showing|shows|with|that|which|features?|featuring|demonstrating|demonstrates|containing|contains|"
    r"has|having)(?![\w-])\s*)*")


def _lower(text: str) -> str:
    """Lower-case with the same length (offsets stay valid)."""
    low = text.lower()
    return low if len(low) == len(text) else "".join(c.lower() if len(c.lower()) == 1 else c for c in text)


def _trim(low: str, s: int, e: int) -> tuple[int, int]:
    """Shrink [s, e) past leading/trailing punctuation and function words."""
    m = _LEAD.match(low, s, e)
    s = m.end() if m else s
    m = _TRAIL.search(low, s, e)
    return s, (m.start() if m else e)


def _content(low: str, s: int, e: int) -> bool:
    s, e = _trim(low, s, e)
    return s < e


def _canon(cue: str) -> str:
    return re.sub(rf"^(?:{_AUX}|has|have)\s+(?:now\s+|also\s+|since\s+)?", "", re.sub(r"\s+", " ", cue))


@dataclass
class _Sentence:
    start: int
    end: int
    clauses: list          # [(start, end)] content clauses, header excluded
    scopes: list           # [(start, end, canonical cue)] negated ranges
    cues: list             # [(start, end)] all cue spans (pseudo included)


def _sentences(low: str) -> list[tuple[int, int]]:
    out, s = [], 0
    for m in list(_SENT_END.finditer(low)) + [None]:
        e = m.start() if m else len(low)
        if low[s:e].strip():
            out.append((s, e))
        s = m.end() if m else e
    return out


def _analyse(low: str) -> list[_Sentence]:
    """Sentences with their clauses, cue spans and negation scopes (absolute offsets)."""
    res = []
    for ss, se in _sentences(low):
        h = _HEADER.match(low, ss, se)
        cs = h.end() if h else ss
        clauses, colon = [], []      # colon[i]: clause i follows a ":"
        for m in list(_BOUNDARY.finditer(low, cs, se)) + [None]:
            e = m.start() if m else se
            clauses.append((cs, e))
            colon.append(cs > ss and low[cs - 1] == ":")
            cs = m.end() if m else se
        scopes, cues = [], []
        for ci, (a, b) in enumerate(clauses):
            found = list(_CUE.finditer(low, a, b))
            cues += [(m.start(), m.end()) for m in found]
            for i, m in enumerate(found):
                kind, prev = m.lastgroup, found[i - 1].end() if i else a
                if kind == "pseudo":
                    continue
                if kind == "dual":
                    kind = "post" if _content(low, prev, m.start()) else "pre"
                cue = _canon(m.group())
                if kind == "post":
                    scopes.append((prev, m.start(), cue))
                    continue
                s, e = m.end(), found[i + 1].start() if i + 1 < len(found) else b
                for w in _WITH.finditer(low, s, e):   # "with" after a negated phrase ends the scope
                    if not _WITH_OK.search(low, s, w.start()) and _content(low, s, w.start()):
                        e = w.start()
                        break
                if not _content(low, s, e) and ci and colon[ci]:
                    s, e = clauses[ci - 1]             # "pneumothorax: negative"
                scopes.append((s, e, cue))
        res.append(_Sentence(ss, se, clauses, scopes, cues))
    return res


def _scope_at(sent: _Sentence, pos: int):
    for s, e, cue in sent.scopes:
        if s <= pos < e:
            return cue
    return None


# ----------------------------------------------------------------------------- vocabulary matching
_LOCATION = {"lung", "lungs", "pulmonary", "pleural", "pericardial", "airspace", "focal", "hepatic", "liver",
             "renal", "kidney", "brain", "cerebral", "breast", "thyroid", "bone", "skin", "cutaneous", "cardiac",
             "chest", "thoracic", "abdominal", "lymph", "intrathoracic", "parenchymal"}
_WORD_SYN = {"lung": "(?:lung|pulmonary)", "pulmonary": "(?:lung|pulmonary)"}
# Paraphrases of a finding (key: a vocabulary name or the head noun it falls back to).
_SYNONYMS = {
    "nodule": [r"nodular (?:opacit(?:y|ies)|densit(?:y|ies)|lesions?)"],
    "cardiomegaly": [r"enlarged (?:heart|cardiac silhouette)", r"cardiac enlargement",
                     r"(?:heart|cardiac silhouette) (?:is|appears) "
                     r"(?:(?:mildly|moderately|markedly|severely) )?enlarged"],
    "asymmetry": [r"asymmetric(?:al)?"],
    "dots and globules": [r"dots?\s*(?:and|/|,)\s*globules?", r"globules?", r"dots"],
    "irregular border": [r"irregular (?:borders?|margins?|outlines?)", r"border irregularity"],
}
# Phrases that state a finding's absence without a cue (their polarity is flipped).
_IMPLIED_ABSENT = {
    "cardiomegaly": [r"(?:heart|cardiac) size (?:is )?(?:within )?normal(?: limits)?",
                     r"normal (?:heart size|cardiac silhouette|cardiac size|heart)",
                     r"(?:heart|cardiac silhouette) (?:is|appears) (?:not enlarged|normal(?: in size)?)"],
    "asymmetry": [r"symmetric(?:al)?"],
    "irregular border": [r"(?:smooth|regular|well-defined|sharply demarcated|well-circumscribed)"
                         r"(?:,?\s+(?:and\s+)?(?:smooth|regular|well-defined|sharply demarcated|well-circumscribed))*"
                         r"\s+(?:outlines?|borders?|margins?)"],
}


def _word(w: str) -> str:
    """Regex for one word with its singular/plural forms."""
    if w in _WORD_SYN:
        return _WORD_SYN[w]
    if w.endswith("ies"):
        return re.escape(w[:-3]) + "(?:y|ies)"
    if len(w) > 2 and w.endswith("y") and w[-2] not in "aeiou":
        return re.escape(w[:-1]) + "(?:y|ies)"
    if w.endswith(("ax", "ex", "ix")):
        return re.escape(w[:-1]) + "(?:x|xes|ces)"
    if w.endswith("is") and len(w) > 4:
        return re.escape(w[:-2]) + "(?:is|es)"
    if w.endswith(("ss", "us", "sh", "ch", "x", "z")):
        return re.escape(w) + "(?:es)?"
    if w.endswith("s") and len(w) > 3:
        return re.escape(w[:-1]) + "(?:s|es)?"
    return re.escape(w) + "s?"


def _words(name: str) -> list[str]:
    return re.findall(r"[a-z0-9]+", name.lower())


@lru_cache(maxsize=64)
def _matcher(vocabulary: tuple[str, ...]) -> list[tuple[re.Pattern, str, int]]:
    """(pattern, vocabulary name, polarity multiplier) for every way a vocabulary entry is written."""
    norm = {v: _words(v) for v in vocabulary}
    heads = [w[-1] for w in norm.values() if w]
    names = {" ".join(w) for w in norm.values()}
    out = []
    for v, ws in norm.items():
        if not ws:
            continue
        pats, keys = [r"[\s/-]+".join(_word(w) for w in ws)], {" ".join(ws)}
        if len(ws) > 1 and set(ws[:-1]) <= _LOCATION and heads.count(ws[-1]) == 1 and ws[-1] not in names:
            pats.append(_word(ws[-1]))       # "effusion" -> "pleural effusion"
            keys.add(ws[-1])
        for k in keys:
            pats += _SYNONYMS.get(k, [])
        out += [(re.compile(rf"{_B}(?:{p}){_E}"), v, AFFIRMED) for p in pats]
        for k in keys:
            out += [(re.compile(rf"{_B}(?:{p}){_E}"), v, NEGATED) for p in _IMPLIED_ABSENT.get(k, [])]
    return out


def _vocab_mentions(low: str, s: int, e: int, vocabulary) -> list[tuple[int, int, str, int]]:
    """Non-overlapping mentions in low[s:e], longest first: (start, end, name, polarity multiplier)."""
    cands = [(m.start(), m.end(), name, flip) for pat, name, flip in _matcher(tuple(vocabulary))
             for m in pat.finditer(low, s, e)]
    cands.sort(key=lambda c: (c[0] - c[1], c[0]))
    taken: list = []
    for c in cands:
        if all(c[1] <= t[0] or c[0] >= t[1] for t in taken):
            taken.append(c)
    return sorted(taken)


# ----------------------------------------------------------------------------- public API
def split_findings(text: str, vocabulary=None) -> list[Finding]:
    """Findings of a report, prompt or caption with polarity, in text order.

    With a `vocabulary` (finding names) only mentions of those names are returned, named as in the
    vocabulary. Without one, every noun phrase is returned as found (lower-case, articles and
    auxiliaries trimmed), coordinated lists split ("no nodule, mass, or consolidation" -> 3).
    """
    if isinstance(vocabulary, str):
        vocabulary = [vocabulary]
    low = _lower(text or "")
    out = []
    for si, sent in enumerate(_analyse(low)):
        if vocabulary is not None:
            for s, e, name, flip in _vocab_mentions(low, sent.start, sent.end, vocabulary):
                cue = _scope_at(sent, s)
                out.append(Finding(text[s:e], name, flip * (NEGATED if cue else AFFIRMED), cue, si, (s, e)))
            continue
        # no vocabulary: cut each clause at cues and scope edges, then into conjuncts
        cuts = sorted({p for a, b in sent.cues for p in (a, b)} | {p for a, b, _ in sent.scopes for p in (a, b)})
        for a, b in sent.clauses:
            pts = [a] + [p for p in cuts if a < p < b] + [b]
            for s0, e0 in zip(pts, pts[1:]):
                if any(ca <= s0 and e0 <= cb for ca, cb in sent.cues):
                    continue
                cue = _scope_at(sent, s0)
                seps = list(_CONJ.finditer(low, s0, e0))
                for ps, pe in zip([s0] + [m.end() for m in seps], [m.start() for m in seps] + [e0]):
                    s, e = _trim(low, ps, pe)
                    if s < e:
                        name = re.sub(r"\s+", " ", low[s:e])
                        out.append(Finding(text[s:e], name, NEGATED if cue else AFFIRMED, cue, si, (s, e)))
    out.sort(key=lambda f: f.span)
    return out


def parse_prompt(prompt: str) -> tuple[str, int]:
    """A zero-shot prompt -> (finding text, polarity): "no effusion" -> ("effusion", -1).

    Image-description prefixes ("a chest x-ray showing ...", "this image features ...") are dropped.
    Raises ValueError for an empty prompt, one with no finding, or one that mixes polarities
    ("cardiomegaly, but no effusion": use split_findings).
    """
    if not prompt or not prompt.strip():
        raise ValueError("empty prompt")
    body = prompt.strip()
    m = _PROMPT_PREFIX.match(_lower(body))
    if m and m.end() and _content(_lower(body), m.end(), len(body)):
        body = body[m.end():]
    found = split_findings(body)
    if not found:
        raise ValueError(f"no finding in prompt {prompt!r}")
    if len({f.polarity for f in found}) > 1:
        raise ValueError(f"prompt {prompt!r} mixes affirmed and negated findings; split it (split_findings)")
    s, e = found[0].span[0], found[-1].span[1]
    low = _lower(body)
    if any(s <= m.start() < e for m in _CUE.finditer(low, s, e)) or any(f.sentence != found[0].sentence for f in found):
        text = ", ".join(f.name for f in found)          # "no effusion, no pneumothorax"
    else:
        text = re.sub(r"\s+", " ", low[s:e])            # keeps "effusion or pneumothorax", "dots and globules"
    return text, found[0].polarity


def negate(finding: str, template: str = NEGATION_TEMPLATES[0]) -> str:
    """Negated caption of a finding, canonically "no {finding}"; a negated input comes back affirmed."""
    text, pol = parse_prompt(finding)
    return template.format(text) if pol == AFFIRMED else text


def affirm(finding: str) -> str:
    """Affirmed caption of a finding: the finding itself."""
    return finding


def report_polarities(text: str, vocabulary) -> dict[str, int]:
    """{name: +1 affirmed anywhere, -1 only negated, 0 not mentioned} for each vocabulary name."""
    out = {v: 0 for v in vocabulary}
    for f in split_findings(text, vocabulary):
        out[f.name] = AFFIRMED if AFFIRMED in (out[f.name], f.polarity) else NEGATED
    return out


def polarity_of(text: str, finding: str) -> int:
    """+1 if `finding` is affirmed in `text`, -1 if it is only negated, 0 if not mentioned."""
    return report_polarities(text, [finding])[finding]
