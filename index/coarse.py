"""The coarse quantizer of an IVF index: exact (Flat) or an HNSW graph over the same centroids, chosen by measurement.

An IVF query first finds its nprobe nearest lists. A Flat quantizer computes a distance to each of the nlist
centroids (nlist * d * 4 bytes); an HNSW32 graph over the same centroids finds them in a few hundred distance
computations (faiss's `IVF{n}_HNSW32`), at a higher cost per distance. Which one pays depends on nlist and nprobe:

- the flat scan grows with nlist (4*sqrt(n): 1,024 lists at 100k vectors, 4,096 at 1M), the graph with nprobe;
- clustered (real) embeddings need only a few lists per query, so at large nlist the graph saves most of the
  centroid scan; unclustered vectors (the synthetic Gaussian spectrum) need many, and the approximate graph misses
  some of them, so nprobe must rise (1M synthetic: nprobe 384 instead of 128 for recall 0.95, 6.1 ms vs 2.9 ms;
  benchmarks/results/search_speed_cpu_1m.md).

Measured on one thread (2-core AMD EPYC, 2026-12-02; nprobe 8 of unit centroids, d 256): nlist 1024 flat 27 us,
graph 31 us; 4096: 66 vs 34 us; 16384: 350 vs 104 us; 65536: 2,544 vs 154 us. A graph step costs about
`GRAPH_STEP` centroid reads of a flat scan (random access, the visited table and the heaps), so the cost model
counts a graph distance as that many flat ones.

So `cxr index build` tunes the default IVF with its flat quantizer first; when the graph would read fewer
(weighted) centroids at the tuned nprobe than the flat scan, it swaps in the graph over the very same centroids
(the inverted lists, codes and re-ranking store are untouched), tunes again, and keeps whichever setting costs less
at the target recall (index/tune.py's cost model). The graph is saved inside the .faiss file, so a reader needs
nothing else; the search record says which quantizer the tuning chose (`coarse`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

HNSW_M = 32
HNSW_DIST_PER_EF = 24  # distance computations per unit of an HNSW search's breadth (~23 measured at 1M vectors)
DEFAULT_EF = 16  # faiss's HNSW efSearch; the quantizer searches max(efSearch, nprobe) wide
GRAPH_STEP = 5  # one graph distance ~ this many flat centroid reads (the timings above)
FLAT, GRAPH = "flat", f"HNSW{HNSW_M}"


def ivf_of(index: Any) -> Any | None:
    """The IVF part of an index (inside a refine step or a pre-transform), or None."""
    import faiss

    try:
        return faiss.extract_index_ivf(index)
    except RuntimeError:
        return None


def kind(index: Any) -> str | None:
    """`flat` or `HNSW32` for an IVF index's coarse quantizer (`HNSWn` for any graph), None for other indexes."""
    import faiss

    ivf = ivf_of(index)
    if ivf is None:
        return None
    q = faiss.downcast_index(ivf.quantizer)
    return f"HNSW{q.hnsw.nb_neighbors(1)}" if isinstance(q, faiss.IndexHNSW) else FLAT


def _centroids_read(ivf: Any, graph: bool, ef: int, nprobe: int) -> float:
    """Centroid reads of one query (graph distances weighted GRAPH_STEP), at most nlist's worth for the graph."""
    if not graph:
        return float(ivf.nlist)
    return float(min(ivf.nlist, HNSW_DIST_PER_EF * max(ef, nprobe)) * GRAPH_STEP)


def coarse_cost(index: Any, params: dict[str, int]) -> float:
    """Bytes of centroids an IVF query reads to find its lists (module docstring); 0 for other indexes."""
    import faiss

    ivf = ivf_of(index)
    if ivf is None:
        return 0.0
    q = faiss.downcast_index(ivf.quantizer)
    graph = isinstance(q, faiss.IndexHNSW)
    ef = int(q.hnsw.efSearch) if graph else 0
    return _centroids_read(ivf, graph, ef, params.get("nprobe", int(ivf.nprobe))) * ivf.d * 4


def graph_pays(index: Any, params: dict[str, int]) -> bool:
    """Whether a flat-quantized IVF index would read fewer (weighted) centroids through a graph at `params`."""
    ivf = ivf_of(index)
    if ivf is None or kind(index) != FLAT:
        return False
    nprobe = params.get("nprobe", int(ivf.nprobe))
    return _centroids_read(ivf, True, DEFAULT_EF, nprobe) < _centroids_read(ivf, False, 0, nprobe)


def _set_quantizer(ivf: Any, new: Any) -> Any:
    """Put `new` in as the IVF's quantizer (the index owns it from now on) and hand back the old one, owned by
    Python so that it is freed once dropped or put back."""
    old = ivf.quantizer
    old.this.acquire()  # the IVF owned it (own_fields); Python owns it now
    new.this.disown()
    ivf.quantizer = new
    ivf.own_fields = True
    return old


def swap(index: Any, to: str) -> Callable[[], None]:
    """Give an IVF index the coarse quantizer `to` (FLAT or GRAPH) over its current centroids; returns a function
    that puts the previous quantizer back. The inverted lists are untouched."""
    import faiss

    ivf = ivf_of(index)
    current = faiss.downcast_index(ivf.quantizer)
    centroids = current.reconstruct_n(0, current.ntotal)
    metric = ivf.metric_type
    new = faiss.IndexHNSWFlat(ivf.d, HNSW_M, metric) if to == GRAPH else faiss.IndexFlat(ivf.d, metric)
    new.add(centroids)
    old = _set_quantizer(ivf, new)

    def restore() -> None:
        _set_quantizer(ivf, old)

    return restore
