"""Search backends and query-time parameters: the raw top-k search under the `Searcher` (index/search.py).

Backends (`backend="auto"`): faiss GPU when `faiss.get_num_gpus() > 0`; else, when torch sees CUDA and the index
keeps exact vectors (Flat, HNSW-Flat), an exact torch matmul + top-k with the vectors on the GPU; else faiss on
the CPU. Every backend answers `search(queries, k) -> (scores, ids)` as faiss does (-inf / -1 padding).
`check_scores` refuses the impossible scores of a damaged index; `set_search_params` / `apply_tuned` set
nprobe / efSearch / k_factor (given, or tuned at build time and recorded in index_info.json).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from retrieval.errors import IndexError_, UsageError

BACKENDS = ("auto", "faiss", "faiss-gpu", "torch")


class FaissBackend:
    """Search a FAISS index as is (CPU), or a GPU copy of it."""

    def __init__(self, index: Any, gpu: bool = False):
        import faiss

        self.name = "faiss-gpu" if gpu else "faiss-cpu"
        self.index = faiss.index_cpu_to_all_gpus(index) if gpu else index

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(scores, ids), each (n_queries, k); ids are -1 where fewer than k results exist."""
        return self.index.search(np.ascontiguousarray(queries, dtype=np.float32), k)


class TorchBackend:
    """Exact inner-product search as a torch matmul + top-k (on CUDA when there; works on CPU tensors too)."""

    def __init__(
        self, vectors: np.ndarray, device: str | None = None, precision: str = "fp32", query_chunk: int = 1024
    ):
        import torch

        from retrieval.device import resolve_device

        if precision not in ("fp32", "bf16", "fp16"):
            raise UsageError(f"precision must be fp32, bf16 or fp16, got {precision!r}")
        self.name = "torch"
        self.device = resolve_device(device)
        self.dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]
        self.vectors = torch.as_tensor(np.ascontiguousarray(vectors, dtype=np.float32)).to(self.device, self.dtype)
        self.query_chunk = query_chunk

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(scores, ids), each (n_queries, min(k, n)) padded to k with -inf / -1, as faiss does."""
        import torch

        n = self.vectors.shape[0]
        kk = min(k, n)
        scores = np.full((len(queries), k), -np.inf, dtype=np.float32)
        ids = np.full((len(queries), k), -1, dtype=np.int64)
        with torch.no_grad():
            for lo in range(0, len(queries), self.query_chunk):
                q = torch.as_tensor(np.ascontiguousarray(queries[lo : lo + self.query_chunk], dtype=np.float32))
                sims = q.to(self.device, self.dtype) @ self.vectors.T
                top = torch.topk(sims.float(), kk, dim=1)
                scores[lo : lo + len(q), :kk] = top.values.cpu().numpy()
                ids[lo : lo + len(q), :kk] = top.indices.cpu().numpy()
        return scores, ids


def exact_vectors(index: Any) -> np.ndarray | None:
    """All vectors of an index that stores them exactly (Flat, HNSW-Flat), else None."""
    import faiss

    idx = faiss.downcast_index(index)
    if isinstance(idx, faiss.IndexHNSWFlat):
        idx = faiss.downcast_index(idx.storage)
    if isinstance(idx, faiss.IndexFlat) and idx.metric_type == faiss.METRIC_INNER_PRODUCT:
        return idx.reconstruct_n(0, idx.ntotal)
    return None


def make_backend(index: Any, backend: str = "auto", device: str | None = None, precision: str = "fp32") -> Any:
    """The search backend for one FAISS index (see the module docstring for the `auto` rule)."""
    import faiss

    if backend not in BACKENDS:
        raise UsageError(f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    if backend == "faiss":
        return FaissBackend(index)
    if backend == "faiss-gpu":
        if faiss.get_num_gpus() == 0:
            raise UsageError("backend 'faiss-gpu' needs faiss with GPU support (pip install 'cxr-retrieval[gpu]')")
        return FaissBackend(index, gpu=True)
    if backend == "torch":
        vectors = exact_vectors(index)
        if vectors is None:
            raise UsageError("the torch backend does exact search and needs a Flat or HNSW-Flat index")
        return TorchBackend(vectors, device, precision)
    # auto
    if str(device) == "cpu":  # an explicit CPU, decided without importing torch (`cxr query` through ONNX Runtime)
        return FaissBackend(index)
    if faiss.get_num_gpus() > 0:
        try:
            return FaissBackend(index, gpu=True)
        except RuntimeError:  # e.g. HNSW has no GPU version: search it on the CPU
            return FaissBackend(index)
    from retrieval.device import resolve_device

    dev = resolve_device(device)  # None and "auto" alike: CUDA when torch sees it
    if dev.type == "cuda":
        vectors = exact_vectors(index)
        if vectors is not None:
            return TorchBackend(vectors, dev, precision)
    return FaissBackend(index)


SCORE_SLACK = 1e-3
_APPROXIMATE_CODES = ("PQ", "SQ", "LSH", "RaBitQ")


def scores_are_bounded(info: dict) -> bool:
    """True when every score of the index must lie in [-1, 1]: normalised vectors, inner product, and a factory
    that keeps exact vectors (or re-ranks with them: `,RFlat`). Compressed codes (PQ, SQ, a Refine(SQ8) re-rank)
    may stray a little."""
    factory = str(info.get("factory", ""))
    reranked_exact = factory.endswith(",RFlat") or factory.endswith(",Refine(Flat)")
    exact = not any(code in factory for code in _APPROXIMATE_CODES) or reranked_exact
    return bool(info.get("normalized", True)) and info.get("metric", "inner_product") == "inner_product" and exact


def check_scores(scores: np.ndarray, ids: np.ndarray, where: Any, norms: np.ndarray | None = None) -> None:
    """The last guard against a damaged index: a score outside [-1 - 1e-3, 1 + 1e-3] (or NaN) among real hits
    cannot come from unit vectors, so the search is refused instead of answered. `norms` (one per query) widens
    the bound for queries that are not unit vectors (|q . x| <= |q| for a unit x)."""
    limit = 1 + SCORE_SLACK
    if norms is not None:
        limit = np.maximum(np.asarray(norms, dtype=np.float64), 1.0)[:, None] * limit
    limit = np.broadcast_to(limit, scores.shape)
    real = ids >= 0
    bad = scores[real & ~((scores >= -limit) & (scores <= limit))]
    if len(bad):
        raise IndexError_(
            f"{where}: damaged, search returned score {float(bad[0]):.6g} outside [-1, 1] on a normalised "
            "inner-product index; run `cxr index verify` and rebuild"
        )


def set_search_params(
    index: Any, nprobe: int | None = None, ef_search: int | None = None, k_factor: int | None = None
) -> None:
    """Set query-time parameters through faiss.ParameterSpace; one the index lacks is a usage error."""
    import faiss

    ps = faiss.ParameterSpace()
    flags = (
        ("--nprobe", "nprobe", nprobe, "IVF indexes"),
        ("--ef-search", "efSearch", ef_search, "HNSW indexes"),
        ("--k-factor", "k_factor_rf", k_factor, "re-ranking indexes (...,RFlat or Refine(...))"),
    )
    for flag, name, value, applies in flags:
        if value is None:
            continue
        if value < 1:
            raise UsageError(f"{flag} must be at least 1, got {value}")
        try:
            ps.set_index_parameter(index, name, int(value))
        except RuntimeError as e:
            kind = type(faiss.downcast_index(index)).__name__
            raise UsageError(f"{flag} applies to {applies}; this index is {kind}") from e


def apply_tuned(index: Any, info: dict, target: str, where: Any) -> dict[str, int]:
    """Set the parameters tuned at build time (index_info.json `search`) on one index; returns them ({} for an
    index written before tuning, which keeps faiss's defaults)."""
    from index.tune import apply_params

    params = dict(((info.get("search") or {}).get(target) or {}).get("params") or {})
    try:
        apply_params(index, params)
    except RuntimeError:
        raise IndexError_(f"{where}: index_info.json records search parameters {params} this index lacks") from None
    return params
