"""Retrieval for the VLM's prompt: pick top-k exemplar reports (never the query's own study or patient) and
assemble the prompt token ids within a token budget (exemplars are truncated, the task prompt never is).

Prompt layout (text part; the image embeddings come before it):
    [CLS] [task] <task prompt> [ref] 1 : <exemplar 1> [ref] 2 : <exemplar 2> ... [SEP]
The number after `[ref]` is the exemplar's rank, the same number the output's `exemplars[i]["ref"]` carries, so
what the model copied can be traced to the exemplar it came from (`copied_sentences`).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Collection, Sequence
from dataclasses import asdict, dataclass

import numpy as np
import pandas as pd

from retrieval.generation.tokenizer import REF_TOKEN, TASK_TOKENS

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


def select_exemplars(
    scores: Sequence[float],
    ids: Sequence[int],
    meta: pd.DataFrame,
    k: int,
    query_study: str | None = None,
    query_patient: str | None = None,
    allowed_studies: Collection[str] | None = None,
    require_report: bool = True,
) -> list[Exemplar]:
    """The first `k` hits (by rank) that are not the query's study or patient, one per study, with a report.

    `ids` index `meta` rows (-1 = no hit, as faiss pads); `allowed_studies` restricts candidates (e.g. to the
    training split so that evaluation prompts never carry other test reports). `require_report=False` keeps
    studies without text (image-to-image neighbours of a set without reports; the prompt skips empty text).
    """
    out: list[Exemplar] = []
    seen: set[str] = set()
    if k <= 0:
        return out
    for score, rid in zip(scores, ids, strict=False):
        if rid < 0:
            continue
        r = meta.iloc[int(rid)]
        study, patient = str(r["study_id"]), str(r["patient_id"])
        report = "" if pd.isna(r.get("report")) else str(r.get("report", "")).strip()
        if study in seen or (require_report and not report):
            continue
        if query_study is not None and study == str(query_study):
            continue
        if query_patient is not None and patient == str(query_patient):
            continue
        if allowed_studies is not None and study not in allowed_studies:
            continue
        seen.add(study)
        out.append(Exemplar(study, patient, float(score), report))
        if len(out) == k:
            break
    return out


def retrieve_exemplars(
    search: Callable[[np.ndarray, int], tuple[np.ndarray, np.ndarray]],
    query_vectors: np.ndarray,
    meta: pd.DataFrame,
    k: int,
    query_studies: Sequence[str | None],
    query_patients: Sequence[str | None],
    allowed_studies: Collection[str] | None = None,
    max_depth: int | None = None,
    require_report: bool = True,
) -> list[list[Exemplar]]:
    """Top-k exemplars for each query vector; searches deeper (doubling) while exclusions leave fewer than k.

    `search(vectors, n) -> (scores (Q, n), ids (Q, n))` is a top-n search over `meta`'s rows (faiss).
    """
    n_rows = len(meta)
    max_depth = min(max_depth or n_rows, n_rows)
    results: list[list[Exemplar] | None] = [None] * len(query_vectors)
    if k <= 0:
        return [[] for _ in query_vectors]
    todo = np.arange(len(query_vectors))
    depth = min(max(4 * k + 16, k), max_depth)
    while len(todo):
        scores, ids = search(np.ascontiguousarray(query_vectors[todo], dtype=np.float32), depth)
        again = []
        for j, q in enumerate(todo):
            ex = select_exemplars(
                scores[j], ids[j], meta, k, query_studies[q], query_patients[q], allowed_studies, require_report
            )
            if len(ex) < k and depth < max_depth:
                again.append(q)
            else:
                results[q] = ex
        todo = np.array(again, dtype=int)
        depth = min(depth * 2, max_depth)
    return [r or [] for r in results]


def build_prompt_ids(
    tok, task: str, prompt: str, exemplars: Sequence[Exemplar], budget: int
) -> tuple[list[int], list[Exemplar]]:
    """Prompt token ids within `budget` tokens, and the exemplars that made it in (possibly truncated).

    The `[CLS] [task] prompt ... [SEP]` frame is always kept whole, even when it alone exceeds the budget;
    exemplars fill what is left in rank order, each cut to fit, and stop once fewer than
    MIN_EXEMPLAR_TOKENS tokens remain.
    """
    head = [tok.cls_token_id, tok.convert_tokens_to_ids(TASK_TOKENS[task])]
    head += tok(prompt, add_special_tokens=False)["input_ids"]
    tail = [tok.sep_token_id]
    ref_id = tok.convert_tokens_to_ids(REF_TOKEN)
    room = budget - len(head) - len(tail)
    body: list[int] = []
    used: list[Exemplar] = []
    for ex in exemplars:
        if not ex.report.strip():
            continue
        mark = [ref_id, *tok(exemplar_marker(len(used) + 1), add_special_tokens=False)["input_ids"]]
        if room - len(mark) < MIN_EXEMPLAR_TOKENS:
            break
        ids = tok(ex.report, add_special_tokens=False)["input_ids"][: room - len(mark)]
        body += [*mark, *ids]
        room -= len(mark) + len(ids)
        used.append(ex)
    return head + body + tail, used


def exemplar_marker(rank: int) -> str:
    """The text after `[ref]` that names exemplar `rank` (1-based) in the prompt."""
    return f"{rank} :"


def sentences(text: str) -> list[str]:
    """Normalised sentences of a report (lower case, single spaces, no final period)."""
    parts = re.split(r"(?<=[.!?])\s+|\n+", str(text).lower())
    return [s for s in (re.sub(r"\s+", " ", p).strip(" .") for p in parts) if s]


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
