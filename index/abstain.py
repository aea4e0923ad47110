"""Knowing when there is no close match: a threshold on the neighbours' scores, calibrated at build time.

A query's *closeness* is the mean score of its `neighbours` nearest rows from other patients: image queries on the
images index, text queries on the reports index. At build time a seeded sample of the collection's own rows are
asked as held-out queries (their own patient left out, as a new patient's image would be), and the threshold is
the `quantile` of their closeness: with the default 0.05, 95% of queries like the collection's own pass, and a
query below it (a lateral film, a photo, a figure, another body part) gets "no close match" instead of far
neighbours ranked as if close. The record lives in index_info.json under `abstain`; `Searcher.match` applies it.
The flag's separation of unlike images from real test images is measured in `benchmarks/abstention.py`.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

QUANTILE = 0.05  # share of held-out in-collection queries that the threshold turns away
NEIGHBOURS = 1  # closeness: the mean score of this many nearest rows of other patients
QUERIES = 1000  # held-out sample size (seeded)
MIN_QUERIES = 50  # fewer usable held-out queries: no threshold (its 5% quantile would rest on one or two scores)
FETCH = 64  # rows fetched per sample query, so that `NEIGHBOURS` rows of other patients remain
MODALITIES = {"image": "images", "text": "reports"}  # query modality -> the index it is judged on


def closeness(
    scores: np.ndarray,
    ids: np.ndarray,
    row_patients: np.ndarray,
    query_patients: np.ndarray,
    neighbours: int = NEIGHBOURS,
) -> np.ndarray:
    """(n_queries,) mean of the top `neighbours` scores among rows of another patient (NaN where too few)."""
    out = np.full(len(scores), np.nan, dtype=np.float64)
    for j in range(len(scores)):
        valid = ids[j] >= 0
        other = row_patients[ids[j][valid]] != query_patients[j]
        kept = scores[j][valid][other][:neighbours]
        if len(kept) == neighbours:
            out[j] = float(np.mean(kept))
    return out  # fmt: skip


def calibrate(
    indexes: dict[str, Any],
    vectors: dict[str, np.ndarray],
    sample: np.ndarray,
    row_patients: np.ndarray,
    quantile: float = QUANTILE,
    neighbours: int = NEIGHBOURS,
) -> dict[str, dict]:
    """The `abstain` record of index_info.json: per query modality, the threshold from held-out sample rows.

    `indexes`: {"images": faiss index, "reports": faiss index}; `vectors`: the same keys -> the sample rows'
    vectors (in `sample` order); `row_patients`: every row's patient id. Modalities with fewer than MIN_QUERIES
    usable sample queries (a tiny or one-patient collection) get no threshold."""
    out: dict[str, dict] = {}
    patients = np.asarray(row_patients).astype(str)
    for modality, key in MODALITIES.items():
        index = indexes[key]
        fetch = min(index.ntotal, FETCH)
        if fetch < 1:
            continue
        scores, ids = index.search(np.ascontiguousarray(vectors[key], dtype=np.float32), fetch)
        close = closeness(scores, ids, patients, patients[sample], neighbours)
        close = close[np.isfinite(close)]
        if len(close) < MIN_QUERIES:
            log.info("no-close-match threshold for %s queries: only %d usable held-out queries, none set",
                     modality, len(close))  # fmt: skip
            continue
        out[modality] = {
            "threshold": round(float(np.quantile(close, quantile)), 6),
            "quantile": quantile,
            "neighbours": neighbours,
            "queries": int(len(close)),
            "median": round(float(np.median(close)), 6),
            "how": f"mean score of the {neighbours} nearest {key} rows of other patients, over held-out "
            f"collection rows; {1 - quantile:.0%} of them reach the threshold",
        }
    return out


def judge(record: dict, score: float) -> dict:
    """{"close", "closeness", "threshold", "quantile"} for one query's closeness under a modality's record."""
    score = float(score)
    close = bool(np.isfinite(score) and score >= float(record["threshold"]))
    closeness = round(score, 6) if np.isfinite(score) else None
    return {"close": close, "closeness": closeness, "threshold": float(record["threshold"]),
            "quantile": float(record.get("quantile", QUANTILE))}  # fmt: skip
