"""The exact truth tuning measures against, and recall@k: the exact top-k of sample queries over a corpus read
chunk by chunk, each query's own row left out, and recall with ties to the k-th true score counted as hits."""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np


def exact_neighbours(
    queries: np.ndarray, chunks: Iterable[np.ndarray], k: int, query_ids: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """(ids, scores): the exact top-k rows (inner product) of each query over the corpus given chunk by chunk
    (memory holds one chunk); with `query_ids`, each query's own row is left out (it is in the corpus)."""
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    kk = k + (1 if query_ids is not None else 0)
    best_s = np.full((len(queries), 0), -np.inf, dtype=np.float32)
    best_i = np.zeros((len(queries), 0), dtype=np.int64)
    offset = 0
    for chunk in chunks:
        if not len(chunk):
            continue
        s = queries @ np.ascontiguousarray(chunk, dtype=np.float32).T
        ids = np.broadcast_to(np.arange(offset, offset + len(chunk), dtype=np.int64), s.shape)
        s = np.concatenate([best_s, s], axis=1)
        ids = np.concatenate([best_i, ids], axis=1)
        if s.shape[1] > kk:
            top = np.argpartition(-s, kk - 1, axis=1)[:, :kk]
            s, ids = np.take_along_axis(s, top, axis=1), np.take_along_axis(ids, top, axis=1)
        best_s, best_i = s, ids
        offset += len(chunk)
    order = np.argsort(-best_s, axis=1, kind="stable")
    return drop_self(np.take_along_axis(best_i, order, axis=1), np.take_along_axis(best_s, order, axis=1),
                     query_ids, k)  # fmt: skip


def drop_self(
    ids: np.ndarray, scores: np.ndarray, query_ids: np.ndarray | None, k: int
) -> tuple[np.ndarray, np.ndarray]:
    """Each row's first k (id, score) pairs other than the query's own row (rows hold k+1)."""
    if query_ids is None:
        return ids[:, :k], scores[:, :k]
    out_i = np.full((len(ids), k), -1, dtype=np.int64)
    out_s = np.full((len(ids), k), -np.inf, dtype=np.float32)
    for j, me in enumerate(query_ids):
        keep = np.flatnonzero(ids[j] != me)[:k]
        out_i[j, : len(keep)] = ids[j, keep]
        out_s[j, : len(keep)] = scores[j, keep]
    return out_i, out_s


TIE = 1e-5


def recalls(
    found: np.ndarray, truth: np.ndarray, found_scores: np.ndarray | None = None, truth_scores: np.ndarray | None = None
) -> np.ndarray:
    """Each query's fraction of its true top-k found in its returned top-k. Given exact scores of both, a hit is
    any returned row scoring at least the k-th true score (less 1e-5): rows tied with the k-th (a report stored
    once per image of its study, duplicate images) are then all right answers."""
    if found_scores is not None and truth_scores is not None:
        kth = truth_scores[:, -1:] - TIE
        hits = ((found >= 0) & (found_scores >= kth)).sum(axis=1)
        valid = np.maximum(1, (truth >= 0).sum(axis=1))
        return np.minimum(hits, valid) / valid
    return np.asarray(
        [len(np.intersect1d(f[f >= 0], t[t >= 0])) / max(1, int((t >= 0).sum())) for f, t in zip(found, truth)],
        dtype=np.float64,
    )


def recall(
    found: np.ndarray, truth: np.ndarray, found_scores: np.ndarray | None = None, truth_scores: np.ndarray | None = None
) -> float:
    """Mean recall@k over the queries (see `recalls`)."""
    per = recalls(found, truth, found_scores, truth_scores)
    return float(per.mean()) if len(per) else 1.0
