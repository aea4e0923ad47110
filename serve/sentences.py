"""Which sentences a drafted report shares with an exemplar's report (what the viewer highlights): the response's
`sentences` and each exemplar's `shared`, `matched` and `report_sentences`, all split and matched by
`retrieval.study_text`, so the viewer needs no sentence rule of its own."""

from __future__ import annotations

from retrieval.study_text import matched_report_sentences, shared_sentences, split_sentences


def annotate_exemplars(result: dict, study_record) -> None:
    """Give each exemplar of a `generate_for_image` result its report, `report_sentences` (that report split into
    sentences), labels, `shared` (the draft's sentences its report also says) and `matched` (those report
    sentences), and list the draft's `sentences` with the exemplars that share each. `study_record(study_id)` -> the
    study's record or None. Changes `result`."""
    exemplars = []
    for e in result.get("exemplars", []):
        study = study_record(str(e["study_id"]))
        report = study["report"] if study else ""
        exemplars.append(
            {
                **e,
                "score": round(float(e["score"]), 6),
                "report": report,
                "report_sentences": split_sentences(report),
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
