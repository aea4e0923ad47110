"""Label vocabulary (CheXpert-14 + Tuberculosis) and a compact rule-based, negation-aware report labeler.

The labeler follows the CheXpert labeler's idea (mention phrases, then negation and uncertainty rules) with
our own small regular-expression rules, so it needs no parser or model:

* a report is split into sentences, and each sentence into clauses at contrast words ("but", "however", ";");
* a *mention* of a label is found by regular expressions ("effusion", "blunting of the costophrenic angle");
* a mention is *negated* when a negation cue ("no", "without", "negative for", "free of", "resolved")
  governs it inside its clause, and *uncertain* when a hedge governs it ("cannot exclude", "possible", "may",
  "borderline"...). Uncertain mentions are not positive (the "U-zeros" policy), negated ones are not either;
* `["No Finding"]` is returned when no label is positive.

`labels_from_mesh` maps the Open-I (IU X-ray) MeSH terms to the same vocabulary; `benchmarks/labeler_iu.py`
measures the text labeler against those MeSH-implied labels on every IU report.

A leaf module: it imports nothing from the project, so every other module may import it. It also names the
anatomy the demo phantom draws (`ANATOMY`) and the one definition of "abnormal" (`is_abnormal`, and
`abnormal_rows` for a multi-hot label matrix).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any

LABELS: list[str] = [
    "No Finding",
    "Enlarged Cardiomediastinum",
    "Cardiomegaly",
    "Lung Opacity",
    "Lung Lesion",
    "Edema",
    "Consolidation",
    "Pneumonia",
    "Atelectasis",
    "Pneumothorax",
    "Pleural Effusion",
    "Pleural Other",
    "Fracture",
    "Support Devices",
    "Tuberculosis",
]
NO_FINDING = "No Finding"

# The anatomy the demo phantom draws and boxes (`anatomy:<name>` in the demo corpus), in the order it boxes them.
ANATOMY: tuple[str, ...] = (
    "Right Lung",
    "Left Lung",
    "Heart",
    "Mediastinum",
    "Aortic Arch",
    "Trachea",
    "Spine",
    "Right Clavicle",
    "Left Clavicle",
    "Right Costophrenic Angle",
    "Right Hemidiaphragm",
    "Left Costophrenic Angle",
    "Left Hemidiaphragm",
)
ANATOMY_PREFIX = "anatomy:"


def is_abnormal(labels: Iterable[str]) -> bool:
    """True when any label other than `No Finding` is present."""
    return any(label != NO_FINDING for label in labels)


def abnormal_rows(label_matrix: Any, no_finding_column: int = 0) -> Any:
    """`is_abnormal` for each row of a (B, L) multi-hot matrix (numpy or torch) whose column `no_finding_column`
    is No Finding: (B,) bool, True where any other column is set."""
    others = [c for c in range(label_matrix.shape[1]) if c != no_finding_column]
    return label_matrix[:, others].any(1)


# ----------------------------------------------------------------------------------------------------
# Mention rules: label -> regular expressions (matched case-insensitively on lower-cased text).
# ----------------------------------------------------------------------------------------------------
# "cardio..." as a whole word: "enlarged cardiomediastinum" is not cardiomegaly (it was, by prefix)
_HEART = r"(?:heart|cardiac|cardio(?:mediastinal|pericardial)?)\b"
_MENTIONS: dict[str, list[str]] = {
    "Enlarged Cardiomediastinum": [
        r"widen\w* (?:of )?(?:the )?(?:superior )?mediastin\w*",
        r"mediastin\w* (?:silhouette |contours? )?(?:is |are |appears |remains )?(?:\w+ly )?"
        r"(?:widen\w*|enlarg\w*)",
        r"enlarged (?:cardio)?mediastin\w*",
        r"mediastinal (?:widening|enlargement)",
        r"(?:prominen\w*|enlarged) (?:of )?(?:the )?(?:superior )?mediastin\w*",
        r"mediastin\w* (?:silhouette |contours? )?(?:is |are |appears )?(?:\w+ly )?prominent",
        r"(?:mediastinal|paratracheal) (?:fullness|prominence|soft tissue fullness)",
        r"(?:fullness|prominence) (?:of |in )?(?:the )?(?:\w+ )?(?:mediastin|paratracheal)\w*",
    ],
    "Cardiomegaly": [
        r"cardiomegaly",
        r"enlarge\w* (?:of )?(?:the )?" + _HEART + r"(?: (?:silhouette|shadow|size))?",
        r"" + _HEART + r" (?:silhouette |shadow |size )?(?:is |are |appears |remains |was )?(?:again )?"
        r"(?:\w+ly |mild to moderately |moderately to severely )?(?:enlarged|large|increased|prominent)",
        r"(?:large|increased|prominent) (?:\w+ )?" + _HEART + r" (?:silhouette|shadow|size)",
    ],
    "Lung Opacity": [
        r"opaci\w*",
        r"infiltrat\w*",
        r"airspace disease|air-space disease|air space disease",
        r"(?<!soft tissue )densit(?:y|ies)",
        r"interstitial (?:marking|pattern|lung disease|disease|prominence|opacit)\w*",
        r"(?:prominent|increased|coarse\w*|chronic) interstitial",
        r"reticul\w*",
        r"(?<!pleural )scar(?:s|ring)?\b",
        r"fibros\w*|fibrotic",
        r"haziness|hazy",
    ],
    "Lung Lesion": [
        r"(?<!calcified )nodul\w*",
        r"\bmass(?:es)?\b",
        r"lump",
        r"cavitary lesion|cavitation|cavity",
        r"carcinoma|neoplasm|tumou?r|malignan\w*|metasta\w*",
        r"(?:lung|pulmonary) lesion",
    ],
    "Edema": [
        r"edema",
        r"heart failure|\bchf\b",
        r"vascular congestion|pulmonary congestion|\bcongesti\w*",
        r"vascular (?:prominence|engorgement|redistribution)|cephalization",
        r"kerley",
    ],
    "Consolidation": [r"consolidat\w*"],
    "Pneumonia": [r"pneumonia\w*|pneumonitis|bronchopneumonia"],
    "Atelectasis": [r"atelecta\w*", r"collapse"],
    "Pneumothorax": [r"pneumothora\w*|pneumothoraces|hydropneumothorax"],
    "Pleural Effusion": [
        r"effusion",
        r"blunt\w* (?:of )?(?:the )?(?:\w+ )?(?:costophrenic|cp|costodiaphragmatic)",
        r"(?:costophrenic|cp) (?:angle|sulcus|sulci|recess)\w* (?:is |are )?(?:\w+ly )?blunt",
        r"hydropneumothorax|hemothorax|fluid in the (?:\w+ )?(?:fissure|pleural)",
        r"pleural fluid",
    ],
    "Pleural Other": [
        r"pleural (?:thickening|scar\w*|plaque\w*|calcification)",
        r"thicken\w* (?:of )?(?:the )?(?:\w+ )?pleura",
        r"pleural[- ]parenchymal scar\w*|pleuroparenchymal|fibrothorax",
        r"apical (?:pleural )?(?:cap|capping)",
    ],
    "Fracture": [r"fractur\w*", r"\bfx\b"],
    "Support Devices": [
        r"pacemaker|pacer|defibrillator|\baicd\b|\bicd\b|cardiac device|generator",
        r"catheter|central line|venous line|\bpicc\b|port-?a-?cath|\bport\b|swan|dialysis",
        r"(?:central|venous|jugular|subclavian|picc|arterial|midline) (?:venous )?line",
        r"(?:endotracheal|tracheostomy|nasogastric|feeding|chest|enteric|\bet\b|\bng\b|\bog\b|dobhoff) tube",
        r"\b(?:et|ng|og) tube|tracheostomy",
        r"sternotomy|sternal wires|median sternotomy|cabg|bypass graft",
        r"surgical (?:staples|hardware)|staples|(?<!cholecystectomy )(?<!surgical )(?:surgical )?clips",
        r"\btip (?:at|in|overl\w*|project\w*|terminat\w*|approximat\w*|near)|shunt|tubing",
        r"\bstent(?:s|ed|ing)?\b|valve replacement|prosthetic valve|annuloplasty",
        r"(?:medical|support|monitoring) device|\bleads?\b|\bwires?\b",
        r"hardware|prosthesis|implant\w*|\bdevice\b",
    ],
    "Tuberculosis": [r"tubercul\w*|\btb\b|mycobacter\w*|koch"],
}


def _bounded(pattern: str) -> str:
    """`pattern` with its open-ended word runs capped at 40 characters: `mediastin\\w* ...` tried at every
    'mediastin' of one giant word would re-scan the rest of the word each time (quadratic); no real word is
    longer, so nothing a report says reads differently."""
    return pattern.replace(r"\w*", r"\w{0,40}").replace(r"\w+", r"\w{1,40}")


_MENTION_RE: dict[str, re.Pattern[str]] = {
    label: re.compile("|".join(f"(?:{_bounded(p)})" for p in pats)) for label, pats in _MENTIONS.items()
}

# Negation cues that govern mentions after them, up to the end of the clause.
_PRE_NEG = re.compile(
    r"\b(?:no|not|without|negative for|free of|clear of|absence of|absent|resolution of|resolved|"
    r"rather than|removal of|removed|nor|never|neither|exclude[sd]?|ruled out|rule out|"
    r"no evidence of|no signs? of|no radiographic evidence of|no definite|no acute|no focal|"
    r"interval clearing of|"
    r"resolving|previously seen|has been removed|no longer)\b"
)
# Negation cues that govern a mention before them (e.g. "effusion has resolved", "heart size is normal").
_POST_NEG = re.compile(
    r"^[^.]{0,40}?\b(?:(?:is|are|was|were|has|have)(?: been)? (?:not|no longer) (?:seen|identified|present|"
    r"visualized|evident|demonstrated|appreciated|noted|detected)|"
    r"(?:has|have)(?: since)? (?:resolved|cleared)|"
    r"resolved|is absent|are absent|(?:is|are|remains?|appears?) (?:within normal limits|normal|unremarkable|"
    r"stable and normal)|within (?:the )?(?:normal limits|limits of normal)|not (?:seen|identified|present|"
    r"appreciated|evident)|(?:has|have) been removed|removed)\b"
)
# Uncertainty cues (pre and post): such mentions are not positive.
_PRE_UNC = re.compile(
    r"\b(?:cannot (?:be )?(?:exclude|excluded|rule out|ruled out)|"
    r"can not (?:be )?(?:exclude|excluded|rule out)|"
    r"not (?:be )?excluded|may|might|could|possibl\w*|questionabl\w*|question of|suspicious|suspect\w*|"
    r"suggest\w*|concern(?:ing)? for|differential|versus|\bvs\b|consider\w*|borderline|equivocal|"
    r"indeterminate|uncertain|cannot be entirely|difficult to exclude|evaluate for|eval for|r/o|rule out)\b"
)
_STRONG_UNC = re.compile(
    r"\b(?:cannot|can not|could not|not) (?:be )?(?:entirely |completely )?"
    r"(?:exclude|excluded|rule out|ruled out)\b|"
    r"\b(?:difficult to|unable to) (?:exclude|rule out)\b"
)
_POST_UNC = re.compile(
    r"^[^.]{0,40}?\b(?:(?:is|are|are not|is not|cannot be|can not be|not) (?:excluded|ruled out)|"
    r"(?:is|are) (?:possible|suspected|questioned|not excluded)|versus|\bvs\b|borderline|"
    r"upper limits? of normal|not entirely excluded)\b"
)
# Clauses end at these words: a cue before them does not govern a mention after them.
_CLAUSE_BREAK = re.compile(
    r"\b(?:but|however|although|though|otherwise|whereas|which|except|apart from|aside from|"
    r"there (?:is|are|has|have)|this|these|with (?:a|an|the|some|mild|moderate|small|large)|"
    r"in addition|also|and (?:a|an|the|mild|moderate|small|large|minimal|stable)|is seen|are seen)\b|[;:]"
)
_RANK = {"negative": 0, "uncertain": 1, "positive": 2}
_SENT_SPLIT = re.compile(r"(?<=[.!?])\s+|\n+")


def clean_text(text: str) -> str:
    """Lower-case, squash whitespace, drop de-identification tokens."""
    text = text.lower().replace("x-xxxx", "x-ray")
    text = re.sub(r"\bxxxx\b", " ", text)
    return re.sub(r"\s+", " ", text).strip()


def sentences(text: str | None) -> list[str]:
    """The cleaned (`clean_text`) sentences of a report, as the labeler reads them."""
    return _SENT_SPLIT.split(clean_text(text or ""))


def whole_sentences(text: str | None) -> list[str]:
    """The cleaned sentences of a report that lost no word to de-identification (IU's `XXXX`): the ones fit to
    quote ("the pulmonary XXXX and mediastinum are within normal limits" reads as nonsense without its word), and
    not the bare list numbers of an impression ("1.", "2.")."""
    raw = (text or "").lower().replace("x-xxxx", "x-ray")
    return [
        clean_text(s) for s in _SENT_SPLIT.split(raw) if re.search(r"[a-z]{2}", s) and not re.search(r"\bxxxx\b", s)
    ]


# How far a cue reaches: NegEx-style scopes are a few words; a cue more than this many characters before a
# mention does not govern it, even inside one clause. The post-cues above match within their first ~130
# characters, so looking this far after a mention changes nothing. Bounding both keeps each mention's cost
# constant, so labelling is linear in the text's length (an unbounded look-back made it quadratic).
SCOPE = 240


def _clause_start(sentence: str, pos: int) -> int:
    """Index where the clause holding `pos` starts (after the last clause break before it), at most `SCOPE`
    characters back (and then at a word's start, so no cue is read from half a word)."""
    lo = max(0, pos - SCOPE)
    if lo > 0:
        space = sentence.find(" ", lo, pos)
        lo = pos if space < 0 else space + 1
    start = lo
    for m in _CLAUSE_BREAK.finditer(sentence, lo, pos):
        start = m.start()
    return start


def _clause_end(sentence: str, pos: int) -> int:
    """Index where the clause holding `pos` ends, at most `SCOPE` characters on."""
    hi = min(len(sentence), pos + SCOPE)
    m = _CLAUSE_BREAK.search(sentence, pos, hi)
    return m.start() if m else hi


def mention_status(sentence: str, start: int, end: int) -> str:
    """Classify one mention `sentence[start:end]` as 'positive', 'negative' or 'uncertain'."""
    before = sentence[_clause_start(sentence, start) : start]
    after = sentence[end : _clause_end(sentence, end)]
    # Hedges like "cannot exclude" hold a negation word but are uncertain, so they are checked first.
    if _STRONG_UNC.search(before) or _POST_UNC.search(after):
        return "uncertain"
    if _PRE_NEG.search(before) or _POST_NEG.search(after):
        return "negative"
    unc = bool(_PRE_UNC.search(before))
    return "uncertain" if unc else "positive"


def label_sentence(sentence: str) -> dict[str, str]:
    """Per label, the strongest status of its mentions in one sentence (positive > uncertain > negative)."""
    found: dict[str, str] = {}
    for label, rx in _MENTION_RE.items():
        for m in rx.finditer(sentence):
            status = mention_status(sentence, m.start(), m.end())
            if label not in found or _RANK[status] > _RANK[found[label]]:
                found[label] = status
    return found


def label_report_detailed(text: str) -> dict[str, str]:
    """Per label mentioned in `text`: 'positive', 'uncertain' or 'negative' (the strongest over sentences)."""
    out: dict[str, str] = {}
    for sentence in sentences(text):
        for label, status in label_sentence(sentence).items():
            if label not in out or _RANK[status] > _RANK[out[label]]:
                out[label] = status
    return out


def label_report(text: str) -> list[str]:
    """Positive labels of a free-text report in `LABELS` order; `["No Finding"]` when nothing is positive."""
    status = label_report_detailed(text)
    positive = [label for label in LABELS if status.get(label) == "positive"]
    return positive or [NO_FINDING]


# ----------------------------------------------------------------------------------------------------
# Open-I MeSH terms -> labels
# ----------------------------------------------------------------------------------------------------
# Head term (before the first "/") -> label. Qualifiers refine some of them below.
_MESH_HEAD: dict[str, str] = {
    "cardiomegaly": "Cardiomegaly",
    "opacity": "Lung Opacity",
    "density": "Lung Opacity",
    "infiltrate": "Lung Opacity",
    "airspace disease": "Lung Opacity",
    "lung diseases, interstitial": "Lung Opacity",
    "pulmonary fibrosis": "Lung Opacity",
    "fibrosis": "Lung Opacity",
    "nodule": "Lung Lesion",
    "mass": "Lung Lesion",
    "cavitation": "Lung Lesion",
    "pulmonary edema": "Edema",
    "pulmonary congestion": "Edema",
    "heart failure": "Edema",
    "consolidation": "Consolidation",
    "pneumonia": "Pneumonia",
    "bronchopneumonia": "Pneumonia",
    "pulmonary atelectasis": "Atelectasis",
    "pneumothorax": "Pneumothorax",
    "hydropneumothorax": "Pneumothorax",
    "hemopneumothorax": "Pneumothorax",
    "pleural effusion": "Pleural Effusion",
    "hemothorax": "Pleural Effusion",
    "fractures, bone": "Fracture",
    "catheters, indwelling": "Support Devices",
    "implanted medical device": "Support Devices",
    "surgical instruments": "Support Devices",
    "tube, inserted": "Support Devices",
    "medical device": "Support Devices",
    "stents": "Support Devices",
    "tuberculosis": "Tuberculosis",
}
_MESH_EXTRA: dict[str, list[str]] = {
    "hydropneumothorax": ["Pleural Effusion"],
    "hemopneumothorax": ["Pleural Effusion"],
}
# Qualifiers that make a term uncertain (not positive), mirroring the text labeler's policy.
_MESH_UNCERTAIN = {"borderline"}


def labels_from_mesh(mesh_terms: Iterable[str]) -> list[str]:
    """Labels implied by Open-I MeSH terms ('Cardiomegaly/mild', 'Pleural Effusion/left/small', 'normal').

    Head terms map to labels; a few qualified terms map by qualifier ('Cardiac Shadow/enlarged' ->
    Cardiomegaly, 'Costophrenic Angle/blunted' -> Pleural Effusion, 'Thickening/pleura' -> Pleural Other,
    'Cicatrix/lung' -> Lung Opacity, 'Mediastinum/enlarged|prominent|widened' -> Enlarged Cardiomediastinum).
    'borderline' terms are uncertain and dropped. Labels in `LABELS` order; `["No Finding"]` when none apply.
    """
    found: set[str] = set()
    for term in mesh_terms:
        parts = [p.strip().lower() for p in str(term).split("/") if p.strip()]
        if not parts:
            continue
        head, quals = parts[0], set(parts[1:])
        if quals & _MESH_UNCERTAIN:
            continue
        if head == "surgical instruments" and "abdomen" in quals:
            continue  # cholecystectomy clips and the like: not a chest support device
        if head in {"opacity", "density"} and "round" in quals:
            found.add("Lung Lesion")  # a round (nodular) opacity is a nodule
        if head in _MESH_HEAD:
            found.add(_MESH_HEAD[head])
            found.update(_MESH_EXTRA.get(head, []))
        elif head in {"cardiac shadow", "heart", "heart ventricles", "heart atria"} and "enlarged" in quals:
            found.add("Cardiomegaly")
        elif head == "costophrenic angle" and "blunted" in quals:
            found.add("Pleural Effusion")
        elif head in {"thickening", "cicatrix", "calcinosis"} and "pleura" in quals:
            found.add("Pleural Other")
        elif head == "cicatrix" and "lung" in quals:
            found.add("Lung Opacity")
        elif head == "markings" and "interstitial" in quals:
            found.add("Lung Opacity")
        elif head == "mediastinum" and quals & {"enlarged", "prominent", "widened", "wide"}:
            found.add("Enlarged Cardiomediastinum")
    return [label for label in LABELS if label in found] or [NO_FINDING]
