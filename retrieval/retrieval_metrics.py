"""Ranking metrics of retrieval as plain numpy functions, so a reader can check each (definitions in
`retrieval/evaluate_retrieval.py`): the ranked relevance of a score matrix, recall/precision@K, average precision, MRR,
and the label relevance matrices (overlapping or identical label sets)."""

from __future__ import annotations

import numpy as np


def ranked_relevance(scores: np.ndarray, relevant: np.ndarray, exclude: np.ndarray | None = None) -> np.ndarray:
    """(Q, G) bool: relevance of each query's gallery items in ranked order (best score first).

    Excluded items are ranked last and never relevant, so they drop out of every metric."""
    scores = np.asarray(scores, dtype=np.float64)
    relevant = np.asarray(relevant, dtype=bool)
    if scores.shape != relevant.shape:
        raise ValueError(f"scores {scores.shape} and relevant {relevant.shape} differ in shape")
    if exclude is not None:
        exclude = np.asarray(exclude, dtype=bool)
        scores = np.where(exclude, -np.inf, scores)
        relevant = relevant & ~exclude
    order = np.argsort(-scores, axis=1, kind="stable")
    return np.take_along_axis(relevant, order, axis=1)


def recall_at_k(ranked: np.ndarray, k: int) -> float:
    """Fraction of queries (with at least one relevant item) that have a relevant item in the top k."""
    has = ranked.any(axis=1)
    if not has.any():
        return float("nan")
    return float(ranked[has, :k].any(axis=1).mean())


def precision_at_k(ranked: np.ndarray, k: int) -> float:
    """Mean over all queries of (relevant items in the top k) / k."""
    if ranked.shape[0] == 0:
        return float("nan")
    return float(ranked[:, :k].sum(axis=1).mean() / k)


def average_precisions(ranked: np.ndarray) -> np.ndarray:
    """(Q,) average precision per query; NaN for a query without any relevant item."""
    ranked = ranked.astype(bool)
    hits = np.cumsum(ranked, axis=1)
    precision = hits / np.arange(1, ranked.shape[1] + 1)
    n_rel = ranked.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(n_rel > 0, (precision * ranked).sum(axis=1) / n_rel, np.nan)


def mean_average_precision(ranked: np.ndarray) -> float:
    """Mean of `average_precisions` over the queries that have a relevant item."""
    ap = average_precisions(ranked)
    ap = ap[~np.isnan(ap)]
    return float(ap.mean()) if ap.size else float("nan")


def mean_reciprocal_rank(ranked: np.ndarray) -> float:
    """Mean of 1 / rank of the first relevant item, over the queries that have a relevant item."""
    has = ranked.any(axis=1)
    if not has.any():
        return float("nan")
    first = ranked[has].argmax(axis=1) + 1
    return float((1.0 / first).mean())


def overlap_matrix(query_labels: np.ndarray, gallery_labels: np.ndarray) -> np.ndarray:
    """(Q, G) bool: the multi-hot label sets share at least one label."""
    return (query_labels.astype(np.float32) @ gallery_labels.astype(np.float32).T) > 0


def same_set_matrix(query_labels: np.ndarray, gallery_labels: np.ndarray) -> np.ndarray:
    """(Q, G) bool: the multi-hot label sets are identical."""
    keys = {}
    q = np.array([keys.setdefault(row.tobytes(), len(keys)) for row in query_labels.astype(bool)])
    g = np.array([keys.setdefault(row.tobytes(), len(keys)) for row in gallery_labels.astype(bool)])
    return q[:, None] == g[None, :]
