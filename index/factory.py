"""Choosing and building the FAISS index type (inner product on L2-normalised vectors = cosine similarity).

The rule when no `--factory` is given (n = number of vectors, d = dimension), the first that fits `--max-memory`:

    n <  50,000      Flat                               exact; fast enough at this size, no training
    otherwise        IVF{nlist},PQ{d/2}x4fs,RFlat       4-bit fast-scan PQ codes (d/4 bytes) scanned in the
                                                        probed lists, the best k * k_factor re-ranked with
                                                        the exact vectors; nlist = 4*sqrt(n) (power of 2)
    less memory      IVF{nlist},PQ{d/2}x4fs,Refine(SQfp16)  re-rank with fp16 vectors (2d bytes/vector)
    least memory     IVF{nlist},PQ{d/2}x4fs,Refine(SQ8)     re-rank with 8-bit codes (d bytes/vector)

HNSW32,Flat (the rule from 50k to 1M before) is no longer chosen: at 10k and 100k vectors the re-ranked
fast-scan IVF answered single queries faster at the same tuned recall and built faster
(benchmarks/results/search_speed_cpu.md); it stays available through --factory. A quantised index always
re-ranks: PQ codes alone cannot order the top 10 (the old rule's IVF4096,PQ64 reached recall@10 0.39 at 1M
even at nprobe 128). efSearch, nprobe and the re-ranking depth k_factor are then tuned at build time to a target
recall (index/tune.py).

Any faiss `index_factory` string is accepted instead (e.g. `OPQ32,IVF4096,PQ32`, `IVF1024,Flat`, `HNSW64`).
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable
from typing import Any

import numpy as np

from retrieval.errors import IndexError_, UsageError

FLAT_MAX = 50_000


def _pq_bytes(dim: int) -> int:
    """The largest divisor of dim that is at most dim/8 (PQ needs m | d)."""
    target = max(1, dim // 8)
    return max(m for m in range(1, target + 1) if dim % m == 0)


def fastscan_m(dim: int) -> int:
    """Sub-quantizers of the 4-bit fast-scan PQ: two dimensions each (the largest even divisor of d up to d/2)."""
    return max(m for m in range(2, max(2, dim // 2) + 1, 2) if dim % m == 0) if dim >= 4 else 2


def nlist_for(n: int) -> int:
    """IVF lists: 4*sqrt(n) rounded to a power of two, with at least 39 training points per list."""
    nlist = 2 ** round(math.log2(4 * math.sqrt(max(n, 1))))
    return int(max(1, min(nlist, 2 ** int(math.log2(max(1, n // 39))))))


def memory_bytes(factory: str, n: int, dim: int) -> int:
    """Estimated RAM of an index of `n` vectors built from one of the rule's factory strings (others: Flat's)."""
    ids = 8 * n
    refine = {"RFlat": 4 * dim, "Refine(SQfp16)": 2 * dim, "Refine(SQ8)": dim}
    extra = next((b for name, b in refine.items() if factory.endswith(name)), 0) * n
    if factory == "Flat":
        return 4 * n * dim
    if factory.startswith("HNSW"):
        m = int(re.match(r"HNSW(\d+)", factory).group(1))
        storage = dim if ",SQ8" in factory else 4 * dim
        return n * (storage + 2 * m * 4 + 16) + extra
    ivf = re.match(r"IVF(\d+),PQ(\d+)x4fs", factory)
    if ivf:
        nlist, m = int(ivf.group(1)), int(ivf.group(2))
        return nlist * dim * 4 + n * (m + 1) // 2 + ids + extra
    return 4 * n * dim


def candidates(n: int, dim: int) -> list[str]:
    """The rule's factory strings for `n` vectors, in order of preference (the first that fits memory wins)."""
    nlist = nlist_for(n)
    ivf = f"IVF{nlist},PQ{fastscan_m(dim)}x4fs"
    quantised = [f"{ivf},RFlat", f"{ivf},Refine(SQfp16)", f"{ivf},Refine(SQ8)"]
    if n < FLAT_MAX:
        return ["Flat", *quantised]
    return quantised


def choose_factory(n: int, dim: int, max_memory: int | None = None) -> str:
    """The factory string for `n` vectors of dimension `dim` (the documented rule), within `max_memory` bytes."""
    options = candidates(n, dim)
    if max_memory is None:
        return options[0]
    for factory in options:
        if memory_bytes(factory, n, dim) <= max_memory:
            return factory
    need = min(memory_bytes(f, n, dim) for f in options)
    raise UsageError(
        f"--max-memory {max_memory / 2**20:.0f} MiB is too small for {n:,} vectors of dim {dim}: the smallest "
        f"re-ranked index needs about {need / 2**20:.0f} MiB"
    )


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


def parse_memory(text: str | int | None) -> int | None:
    """`--max-memory` as bytes: a plain number of bytes or one with a unit (512M, 4G, 1.5GiB, 800MB)."""
    if text is None or isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kKmMgGtT]?)(?:i?[bB])?\s*", str(text))
    if not m:
        raise UsageError(f"--max-memory: expected a size such as 512M or 4G, got {text!r}")
    scale = {"": 1, "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40}[m.group(2).lower()]
    value = int(float(m.group(1)) * scale)
    if value <= 0:
        raise UsageError(f"--max-memory must be positive, got {text!r}")
    return value
