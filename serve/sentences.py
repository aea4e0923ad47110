"""Which sentences a drafted report shares with an exemplar's report (what the viewer highlights)."""

from __future__ import annotations

import re

_SENTENCE = re.compile(r"[^.!?\n]+[.!?]?")


def split_sentences(text: str) -> list[str]:
    """Sentences of a report, as written (a sentence ends at . ! ? or a line break)."""
    return [s.strip() for s in _SENTENCE.findall(str(text or "")) if re.search(r"\w", s)]


def _norm(sentence: str) -> str:
    return re.sub(r"[^a-z0-9]+", " ", sentence.lower()).strip()


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


def _matches(text: str, report: str) -> list[tuple[str, str]]:
    rep = [(r, f" {_norm(r)} ") for r in split_sentences(report)]
    pairs = []
    for s in split_sentences(text):
        n = _norm(s)
        for r, padded in rep:
            if n and (padded.strip() == n or (len(n.split()) >= 3 and f" {n} " in padded)):
                pairs.append((s, r))
                break
    return pairs


def annotate_exemplars(result: dict, study_record) -> None:
    """Give each exemplar of a `generate_for_image` result its report, labels, `shared` (the draft's sentences
    its report also says) and `matched` (those report sentences), and list the draft's `sentences` with the
    exemplars that share each. `study_record(study_id)` -> the study's record or None. Changes `result`."""
    exemplars = []
    for e in result.get("exemplars", []):
        study = study_record(str(e["study_id"]))
        report = study["report"] if study else ""
        exemplars.append(
            {
                **e,
                "score": round(float(e["score"]), 6),
                "report": report,
                "labels": study["labels"] if study else [],
                "shared": shared_sentences(result["text"], report),
                "matched": matched_report_sentences(result["text"], report),
            }
        )
    result["exemplars"] = exemplars
    result["sentences"] = [
        {"text": s, "exemplars": [e["study_id"] for e in exemplars if s in e["shared"]]}
        for s in split_sentences(result["text"])
    ]
