"""The study's text: which text a manifest row's study has, its sentences, and the sentences two texts share.

Every module that reads a report's text or its sentences calls this one (issue 25):

* `report_text(row)`: the text a study is indexed, trained and evaluated on: `report`, else findings + impression.
  `sections_text(row)` prefers the sections instead (findings + impression, else `report`): the VLM's `[report]`
  target, which should be the radiologist's written sections, not an indication or history a whole report carries.
* `split_sentences(text)`: the sentences as written. A sentence ends at `.`, `!` or `?` followed by white space
  (or, with no space, by a capital after a lower-case letter: "apex.There"), or at a line break; but not after an
  abbreviation ("Dr. Smith", "e.g. a") nor after a list number that opens a sentence or a line or follows a colon
  ("1. Small effusion.", "IMPRESSION: 1. No acute process."), and a decimal ("A 1.5 cm nodule.") never ends one,
  since no space follows its point. One regular expression, linear in the text's length.
* Readings of those sentences: `clean_sentences` (the labeler's: lower case, de-identification tokens dropped),
  `whole_sentences` (the cleaned ones fit to quote), `normalized_sentences` (lower case, single spaces, no final
  period: what RAG compares to find copied sentences).
* `shared_sentences` / `matched_report_sentences`: the sentences of a text that a report also says (what the viewer
  highlights), and the report's sentences that say them. `first_sentence`: a report's opening sentence.

A leaf module: it imports nothing from the project, so every layer may use it.
"""

from __future__ import annotations

import re
from typing import Any

# Words that end with a period but do not end a sentence. Kept to those that practically never close one in a report
# ("etc.", "cm." and "no." often do, so they are left out).
ABBREVIATIONS = frozenset({"dr", "drs", "mr", "mrs", "ms", "prof", "st", "vs", "e.g", "i.e", "cf", "approx", "fig"})


def _not_after(endings: list[str]) -> str:
    """Negative look-behinds (each of fixed width, so the pattern stays linear) for these endings of a piece."""
    return "".join(f"(?<!{e})" for e in endings)


_ABBREVIATION_ENDS = [rf"(?i:\b{re.escape(a)})\." for a in sorted(ABBREVIATIONS)]
# A list number ("1." or "12.") that opens the text or a line, or follows a sentence's end or a colon (after up to
# two white-space characters).
_LIST_NUMBER_ENDS = [
    rf"{before}{space}{digits}\."
    for digits in (r"\d", r"\d\d")
    for before in ("^", r"\n", r"[.!?]", ":")
    for space in ("", r"\s", r"\s\s")
    if before in ("^", r"\n", ":") or space
]
# Where a sentence ends: a line break; ! or ? then white space; a period then white space unless it closes an
# abbreviation or a list number; or . ! ? between a lower-case letter and a capital with no space ("apex.There": a
# typing slip; lower-cased text never has it). One regular expression of fixed look-behinds: linear in the length
# (the leading look-ahead turns most positions away with one test).
_CUT = re.compile(
    r"(?=[\sA-Z])(?:\n\s*|(?<=[!?])\s+|(?<=\.)" + _not_after(_ABBREVIATION_ENDS + _LIST_NUMBER_ENDS) + r"\s+"
    r"|(?<=[a-z][.!?])(?=[A-Z]))"
)
_LIST_MARKER = re.compile(r"^\d{1,2}[.)]\s+")
_WORD_CHAR = re.compile(r"\w")
_TWO_LETTERS = re.compile(r"[a-z]{2}")
_XXXX = re.compile(r"\bxxxx\b")
_SPACES = re.compile(r"\s+")
_NON_WORD = re.compile(r"[^a-z0-9]+")


def _field(row: Any, name: str) -> str:
    """`row[name]` as stripped text; missing, None and NaN read as empty."""
    value = row.get(name) if hasattr(row, "get") else None
    if value is None or (isinstance(value, float) and value != value):
        return ""
    return str(value).strip()


def _sections(row: Any) -> str:
    return " ".join(p for p in (_field(row, "findings"), _field(row, "impression")) if p)


def report_text(row: Any) -> str:
    """The text of a manifest row's study (a dict, Series or record): its `report`, else its findings + impression
    sections joined by a space; empty when it has none."""
    return _field(row, "report") or _sections(row)


def sections_text(row: Any) -> str:
    """Findings + impression, else the `report` when both sections are empty (the VLM's report target)."""
    return _sections(row) or _field(row, "report")


def split_sentences(text: str | None) -> list[str]:
    """The sentences of `text` as written, stripped; pieces without a letter or digit are dropped."""
    return [s.strip() for s in _CUT.split(str(text or "")) if _WORD_CHAR.search(s)]


def strip_list_marker(sentence: str) -> str:
    """A sentence without its leading list number ("1. small effusion." -> "small effusion.")."""
    return _LIST_MARKER.sub("", sentence, count=1) if sentence[:1].isdigit() else sentence


def clean_text(text: str) -> str:
    """Lower-case, squash white space, drop de-identification tokens (IU's `XXXX`)."""
    text = _XXXX.sub(" ", text.lower().replace("x-xxxx", "x-ray"))
    return _SPACES.sub(" ", text).strip()


def clean_sentences(text: str | None) -> list[str]:
    """The sentences of the cleaned (`clean_text`) report, as the labeler reads them."""
    return split_sentences(clean_text(text or ""))


def whole_sentences(text: str | None) -> list[str]:
    """The cleaned sentences of a report that lost no word to de-identification (IU's `XXXX`), without list numbers:
    the ones fit to quote ("the pulmonary XXXX and mediastinum are within normal limits" reads as nonsense without
    its word)."""
    raw = (text or "").lower().replace("x-xxxx", "x-ray")
    whole = [s for s in split_sentences(raw) if _TWO_LETTERS.search(s) and not _XXXX.search(s)]
    return [clean_text(strip_list_marker(s)) for s in whole]


def normalized_sentences(text: str | None) -> list[str]:
    """Sentences in lower case with single spaces, no list number and no final period."""
    parts = (_SPACES.sub(" ", strip_list_marker(s)).strip(" .") for s in split_sentences(str(text or "").lower()))
    return [s for s in parts if s]


def first_sentence(text: str | None) -> str:
    """A report's first sentence as written (empty when it has none)."""
    sentences = split_sentences(text)
    return sentences[0] if sentences else ""


# ---------------------------------------------------------------------------------------------- shared sentences
def sentence_key(sentence: str) -> str:
    """What two sentences are compared by: their words and numbers in lower case, list number, case and
    punctuation ignored."""
    return _NON_WORD.sub(" ", strip_list_marker(sentence.strip()).lower()).strip()


def _matches(text: str, report: str) -> list[tuple[str, str]]:
    """(sentence of `text`, sentence of `report` that says it) pairs, in `text`'s order."""
    rep = [(r, f" {sentence_key(r)} ") for r in split_sentences(report)]
    pairs = []
    for s in split_sentences(text):
        n = sentence_key(s)
        for r, padded in rep:
            if n and (padded.strip() == n or (len(n.split()) >= 3 and f" {n} " in padded)):
                pairs.append((s, r))
                break
    return pairs


def shared_sentences(text: str, report: str) -> list[str]:
    """The sentences of `text` that `report` also says, in `text`'s order: the same sentence (case and punctuation
    ignored), or, for three words or more, the same words in a row inside one of the report's sentences
    ("the lungs are clear" in "The lungs are clear, and without focal airspace opacity")."""
    out: list[str] = []
    for s, _ in _matches(text, report):
        if s not in out:  # a draft that repeats a sentence shares it once
            out.append(s)
    return out


def matched_report_sentences(text: str, report: str) -> list[str]:
    """The sentences of `report` that contain a sentence of `text` (what the viewer highlights in an exemplar)."""
    out: list[str] = []
    for _, r in _matches(text, report):
        if r not in out:
            out.append(r)
    return out
