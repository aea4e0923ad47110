"""The levers of the default re-ranked fast-scan IVF index, each measured at its tuned parameters (issue 15's 1M row).

`search_speed --levers` calls `lever_rows` after the default index is built and tuned. Every variant keeps the
default's coarse centroids where the lever allows it (same k-means, so the comparison isolates the one change) and is
tuned to the same target recall the way `cxr index build` tunes, then measured on the same held-out queries:

    omp 1 thread at batch 1   the default index and parameters, faiss searching single queries on one thread
                              (no OpenMP fork/join per query; the other core stays free for another query)
    PQ m = d/4                4-bit PQ with half the sub-quantizers (d/8 bytes per code instead of d/4): half the
                              codes' bytes per probed list, coarser distances, so a deeper re-rank
    other coarse quantizer    the default's lists found through the quantizer the build did not pick (an HNSW32
                              graph over the same centroids, or the exact flat scan; index/coarse.py)
    nlist / 4                 fewer, longer lists (a new k-means): more codes per probe, fewer centroids

`bound` turns a measured row into what caps its speed: the codes scanned per query and the nanoseconds each costs
on this machine, so that the distance computations a 300x-Flat query may afford can be set against those that
recall@10 0.95 needs.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np


def _centroids(index) -> np.ndarray:
    import faiss

    q = faiss.extract_index_ivf(index).quantizer
    return q.reconstruct_n(0, q.ntotal)


def _with_centroids(factory: str, centroids: np.ndarray, base: np.ndarray):
    """An index from `factory` whose coarse quantizer holds `centroids` (no k-means; the codebooks are trained on
    the same sample `cxr index build` draws), filled with `base`; (index, build seconds)."""
    import faiss

    from index.factory import make_index, train_index, train_size

    t0 = time.perf_counter()
    index = make_index(factory, base.shape[1])
    faiss.extract_index_ivf(index).quantizer.add(np.ascontiguousarray(centroids, dtype=np.float32))
    n = train_size(index, len(base))
    rng = np.random.default_rng(0)
    train_index(index, base[np.sort(rng.choice(len(base), n, replace=False))], factory)
    for s in range(0, len(base), 100_000):
        index.add(base[s : s + 100_000])
    return index, time.perf_counter() - t0


def bound(row: dict) -> dict:
    """ns per scanned code at batch 1 (the whole p50 spread over the codes scanned: an upper bound of the scan's
    own cost) for a row with dist_per_query."""
    d = row.get("dist_per_query")
    return {"ns_per_code_b1": row["p50_ms_b1"] * 1e6 / d} if d else {}


def lever_rows(
    add: Callable[..., None],
    default_index,
    default_factory: str,
    base: np.ndarray,
    measure_tuned: Callable[..., None],
    measure_fixed: Callable[..., dict],
    params: dict,
    threads: int,
) -> None:
    """Add one row per lever (module docstring). `measure_tuned(index, factory, label, build_s, mem)` tunes and
    measures a variant and adds its row; `measure_fixed(index, params)` measures the index at fixed parameters."""
    import faiss

    from index import coarse, tune
    from index.factory import fastscan_m, memory_bytes, nlist_for

    n, dim = base.shape
    nlist = nlist_for(n)
    tune.apply_params(default_index, params)
    faiss.omp_set_num_threads(1)
    try:
        r = measure_fixed(default_index, params)
    finally:
        faiss.omp_set_num_threads(threads)
    mem = memory_bytes(default_factory, n, dim) / 2**20
    add(f"faiss {default_factory} (lever: omp 1 thread; tuned params)", _params(params), 0.0, mem, r)

    centroids = _centroids(default_index)
    m = fastscan_m(dim)
    # the other coarse quantizer over the same lists (the default rule picked one of the two; index/coarse.py)
    other = coarse.FLAT if coarse.kind(default_index) == coarse.GRAPH else coarse.GRAPH
    restore = coarse.swap(default_index, other)
    try:
        measure_tuned(default_index, default_factory, f"lever: {other} coarse quantizer, same lists", 0.0, mem)
    finally:
        restore()
        tune.apply_params(default_index, params)
    factory = f"IVF{nlist},PQ{m // 2}x4fs,RFlat"
    index, build_s = _with_centroids(factory, centroids, base)
    measure_tuned(index, factory, "lever: PQ m = d/4, same centroids", build_s, memory_bytes(factory, n, dim) / 2**20)
    del index
    from benchmarks.search_speed import build

    factory = f"IVF{max(1, nlist // 4)},PQ{m}x4fs,RFlat"
    index, build_s, _ = build(factory, base)
    measure_tuned(index, factory, "lever: nlist / 4, own k-means", build_s, memory_bytes(factory, n, dim) / 2**20)


def _params(params: dict) -> str:
    return " ".join(f"{k}={v}" for k, v in params.items())
