"""Choosing and building the FAISS index type (inner product on L2-normalised vectors = cosine similarity).

The rule when no `--factory` is given (n = number of vectors, d = dimension):

    n <  50,000      Flat                     exact; fast enough at this size, no training
    n <  1,000,000   HNSW32,Flat              graph search, no training, ~recall 0.99 at efSearch 128
    otherwise        IVF{nlist},PQ{m}         nlist = 4*sqrt(n) rounded to a power of 2, m = d/8 bytes/vector

Any faiss `index_factory` string is accepted instead (e.g. `OPQ32,IVF4096,PQ32`, `IVF1024,Flat`, `HNSW64`).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import numpy as np

from retrieval.errors import IndexError_, UsageError

FLAT_MAX = 50_000
HNSW_MAX = 1_000_000


def _pq_bytes(dim: int) -> int:
    """The largest divisor of dim that is at most dim/8 (PQ needs m | d)."""
    target = max(1, dim // 8)
    return max(m for m in range(1, target + 1) if dim % m == 0)


def choose_factory(n: int, dim: int) -> str:
    """The factory string for `n` vectors of dimension `dim` (the documented size rule)."""
    if n < FLAT_MAX:
        return "Flat"
    if n < HNSW_MAX:
        return "HNSW32,Flat"
    nlist = 2 ** round(math.log2(4 * math.sqrt(n)))
    return f"IVF{nlist},PQ{_pq_bytes(dim)}"


def make_index(factory: str, dim: int) -> Any:
    """An empty inner-product FAISS index from a factory string; an unparsable string is a usage error."""
    import faiss

    try:
        return faiss.index_factory(int(dim), factory, faiss.METRIC_INNER_PRODUCT)
    except RuntimeError as e:
        msg = str(e).strip().splitlines()[-1]
        raise UsageError(f"--factory {factory!r}: faiss cannot build it for dim {dim} ({msg[-160:]})") from e


def train_size(index: Any, n: int) -> int:
    """How many vectors to train on: all for small sets, else enough for every centroid and codebook."""
    import faiss

    want = 100_000
    try:
        ivf = faiss.extract_index_ivf(index)
        want = max(want, 64 * int(ivf.nlist))
    except RuntimeError:
        pass
    return min(n, want)


def train_index(index: Any, sample: np.ndarray, factory: str = "") -> None:
    """Train `index` on `sample` when its type needs it (IVF, PQ, OPQ); a clear error when too few vectors."""
    import faiss

    if index.is_trained:
        return
    try:
        ivf = faiss.downcast_index(faiss.extract_index_ivf(index))
        if hasattr(ivf, "do_polysemous_training"):
            ivf.do_polysemous_training = False  # only used by polysemous search (not ours); costs minutes
    except RuntimeError:
        pass
    # faiss 1.15 ships distance_compute_blas_threshold = 128000: k-means on fewer points (every PQ sub-quantizer,
    # IVF on small samples) then runs scalar distance loops. BLAS from 20 points on trains IVF256,PQ64 on 10k
    # vectors in 5.5 s instead of 89 s (benchmarks/results/search_speed_cpu.md).
    threshold = faiss.cvar.distance_compute_blas_threshold
    faiss.cvar.distance_compute_blas_threshold = min(threshold, 20)
    try:
        index.train(np.ascontiguousarray(sample, dtype=np.float32))
    except RuntimeError as e:
        msg = str(e).strip().splitlines()[-1]
        raise IndexError_(
            f"cannot train {factory or 'the index'} on {len(sample)} vectors ({msg[-200:]}); "
            "use a smaller nlist/PQ or the default factory for this corpus size"
        ) from e
    finally:
        faiss.cvar.distance_compute_blas_threshold = threshold


def add_chunks(index: Any, chunks: Iterable[np.ndarray]) -> int:
    """Add vectors chunk by chunk (memory stays flat apart from the index itself); returns how many."""
    total = 0
    for chunk in chunks:
        if len(chunk):
            index.add(np.ascontiguousarray(chunk, dtype=np.float32))
            total += len(chunk)
    return total


def build_from_vectors(vectors: np.ndarray, factory: str | None = None) -> tuple[Any, str]:
    """Build an index over in-memory vectors (tests and small corpora): returns (index, factory used)."""
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    factory = factory or choose_factory(len(vectors), vectors.shape[1])
    index = make_index(factory, vectors.shape[1])
    if not index.is_trained:
        rng = np.random.default_rng(0)
        n = train_size(index, len(vectors))
        sample = vectors if n == len(vectors) else vectors[np.sort(rng.choice(len(vectors), n, replace=False))]
        train_index(index, sample, factory)
    index.add(vectors)
    return index, factory
