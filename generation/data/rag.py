"""Retrieval for the VLM's prompt: top-k exemplar reports through the index's one search filter
(`Searcher.search_ids`: never the query's own study or patient, one per study), and the prompt token ids
assembled within a token budget (exemplars are truncated, the task prompt never is).

Prompt layout (text part; the image embeddings come before it):
    <frame> [task] <task prompt> <findings> [ref] 1 : <exemplar 1> [ref] 2 : <exemplar 2> ... <frame>
The frame is `tokenizer.prompt_frame`: `[CLS]` ... `[SEP]` for the tiny LM's WordPiece vocabulary, the LM's chat
template (system turn, user turn, assistant prompt) for a pretrained LM, where each part starts a new line.
`<findings>` is the finding head's "Likely findings: ..." line (`findings_prompt.py`) when the caller gives one.
The number after `[ref]` is the exemplar's rank, the same number the output's `exemplars[i]["ref"]` carries, so
what the model copied can be traced to the exemplar it came from (`copied_sentences`).
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from generation.model.tokenizer import REF_TOKEN, TASK_TOKENS, prompt_frame
from retrieval.study_text import normalized_sentences as sentences

# Shortest exemplar slice worth adding: fewer tokens than this say nothing and only cost attention.
MIN_EXEMPLAR_TOKENS = 4


@dataclass
class Exemplar:
    """One retrieved report used as context."""

    study_id: str
    patient_id: str
    score: float
    report: str

    def to_dict(self, with_report: bool = True) -> dict:
        """JSON-ready; `with_report=False` leaves the text out (for compact output)."""
        d = asdict(self)
        if not with_report:
            d.pop("report")
        return d


def exemplars_from_hits(scores: Sequence[float], ids: Sequence[int], searcher: Any) -> list[Exemplar]:
    """The Exemplars of already filtered hits (`Searcher.search_ids` rows; -1 = no hit, skipped); a row without a
    report (`has_report` false) gets empty text."""
    studies, patients = searcher.column("study_id"), searcher.column("patient_id")
    reports, has_report = searcher.column("report"), searcher.column("has_report")
    out: list[Exemplar] = []
    for score, rid in zip(scores, ids, strict=True):
        if rid < 0:
            continue
        text = reports[rid] if bool(has_report[rid]) and not pd.isna(reports[rid]) else ""
        out.append(Exemplar(str(studies[rid]), str(patients[rid]), float(score), str(text).strip()))
    return out


def retrieve_exemplars(
    searcher: Any,
    query_vectors: np.ndarray,
    k: int,
    query_studies: Sequence[str | None],
    query_patients: Sequence[str | None],
    allowed_studies: Collection[str] | None = None,
    target: str = "reports",
) -> list[list[Exemplar]]:
    """Top-k exemplars for each query vector from `searcher` (an `index.search.Searcher`): never the query's own
    study or patient, one per study, only `allowed_studies` (e.g. the training split, so that evaluation prompts
    never carry other test reports).

    `target="reports"` searches image-to-report and keeps studies with a report; `"images"` searches
    image-to-image and keeps text-less studies too (neighbours of a set without reports; the prompt skips empty
    text). The filter and the widening are `Searcher.search_ids`'s."""
    if k <= 0 or not len(query_vectors):
        return [[] for _ in query_vectors]
    allowed = None if allowed_studies is None else searcher.study_mask(allowed_studies)
    scores, ids = searcher.search_ids(
        np.ascontiguousarray(query_vectors, dtype=np.float32),
        k,
        target,
        exclude_patients=list(query_patients),
        exclude_studies=list(query_studies),
        allowed=allowed,
        require_report=target == "reports",
        per_study=True,
    )
    return [exemplars_from_hits(s, i, searcher) for s, i in zip(scores, ids, strict=True)]


def build_prompt_ids(
    tok, task: str, prompt: str, exemplars: Sequence[Exemplar], budget: int, findings: str | None = None
) -> tuple[list[int], list[Exemplar]]:
    """Prompt token ids within `budget` tokens, and the exemplars that made it in (possibly truncated).

    The frame, `[task] prompt` and the `findings` line are always kept whole, even when they alone exceed the
    budget; exemplars fill what is left in rank order, each cut to fit, and stop once fewer than
    MIN_EXEMPLAR_TOKENS tokens remain.
    """

    def enc(text: str) -> list[int]:  # WordPiece drops the separators; a byte-level vocabulary keeps them
        return tok(text, add_special_tokens=False)["input_ids"]

    before, tail = prompt_frame(tok)
    head = [*before, tok.convert_tokens_to_ids(TASK_TOKENS[task]), *enc(" " + prompt)]
    if findings:
        head += enc("\n" + findings)
    ref_id = tok.convert_tokens_to_ids(REF_TOKEN)
    room = budget - len(head) - len(tail)
    body: list[int] = []
    used: list[Exemplar] = []
    for ex in exemplars:
        if not ex.report.strip():
            continue
        mark = [*enc("\n"), ref_id, *enc(" " + exemplar_marker(len(used) + 1))]
        if room - len(mark) < MIN_EXEMPLAR_TOKENS:
            break
        ids = enc(" " + ex.report)[: room - len(mark)]
        body += [*mark, *ids]
        room -= len(mark) + len(ids)
        used.append(ex)
    return head + body + tail, used


def exemplar_marker(rank: int) -> str:
    """The text after `[ref]` that names exemplar `rank` (1-based) in the prompt."""
    return f"{rank} :"


def copied_sentences(text: str, exemplars: Sequence[Exemplar]) -> list[dict]:
    """For each exemplar (by rank, 1-based), the output's sentences that appear verbatim in its report."""
    out_s = sentences(text)
    found = []
    for rank, ex in enumerate(exemplars, start=1):
        theirs = set(sentences(ex.report))
        same = [s for s in out_s if s in theirs]
        if same:
            found.append({"ref": rank, "study_id": ex.study_id, "sentences": same})
    return found


def dicom_study_uid(path: str | Path) -> str:
    """The StudyInstanceUID in a DICOM file's header ('' for any other file): how an image from the archive is
    recognised as an indexed study whatever its path."""
    import pydicom

    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["StudyInstanceUID"])
    except Exception:  # not DICOM, unreadable: read_image reports it
        return ""
    return str(ds.get("StudyInstanceUID", "") or "").strip()


def indexed_study(meta: pd.DataFrame, image: str | Path) -> tuple[str | None, str | None]:
    """(study_id, patient_id) of an image file that is in the index (`meta`): by its path, or for a DICOM file by
    its StudyInstanceUID (the same study from the archive under another path: a DICOM export, a cache); else
    (None, None)."""
    hit = meta[meta["image_path"].astype(str) == str(Path(image).resolve())]
    study_uid = "" if len(hit) else dicom_study_uid(image)
    if study_uid:
        hit = meta[meta["study_instance_uid"].astype(str) == study_uid]
    if not len(hit):
        return None, None
    return str(hit.iloc[0]["study_id"]), str(hit.iloc[0]["patient_id"])
