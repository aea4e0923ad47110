"""Build-time tuning of query parameters (efSearch, nprobe, re-ranking depth) to a target recall.

The idea of autofaiss's `tune_index`, written for this project: a seeded sample of the corpus's own vectors is
searched against the finished index and against exact search, and the cheapest parameters whose recall@10 reaches
the target are kept. Each sample vector is in the index, so both the exact and the approximate answers drop the
query's own row (search k+1, remove the self hit): the sample then behaves like held-out queries from the same
distribution rather than handing every query one free hit.

The knobs an index has:

    efSearch   HNSW graph search breadth            (HNSW32,Flat; HNSW32,SQ8,RFlat)
    nprobe     IVF inverted lists visited           (IVF..,Flat; IVF..,PQ..x4fs,RFlat)
    k_factor   re-ranking depth of a refine step: the base index returns k * k_factor candidates and the
               refine index (RFlat = exact vectors, Refine(SQ8) = 8-bit codes) re-scores them

A setting passes when the sample's mean recall less one standard error reaches the target (1,000 queries: about
0.003 at recall 0.95), so that new queries, another sample of the same kind, do not land just below it half the
time. "Cheapest" is a cost model in bytes touched per query, not a timing (timings on a shared machine are noise):
scanned codes for IVF (nprobe * n / nlist * code size) plus the centroids its quantizer reads (`coarse_cost`),
~24 distance computations per unit of efSearch for HNSW (benchmarks/results/search_speed_cpu.md measured ~23 at
1M), and k * k_factor random fetches of the refine vectors, weighted 4x for being random. Recall is taken as
monotone in each knob, so the smallest passing value is found by bisection over a fixed ladder of candidates.
Graph indexes look better on their own points than on new queries, so their sample rows get noise first
(`tuning_queries`). Which coarse quantizer an IVF index of the default rule uses is chosen with this cost model too
(index/coarse.py)."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from index import coarse
from index.coarse import HNSW_DIST_PER_EF, coarse_cost
from index.recall import drop_self, exact_neighbours, recalls

log = logging.getLogger(__name__)

K = 10
DEFAULT_TARGET = 0.95
DEFAULT_QUERIES = 1000
EF_LADDER = (16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024, 1536, 2048)
NPROBE_LADDER = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024, 2048, 4096)
K_FACTOR_LADDER = (1, 2, 4, 8, 16, 32, 64)
RANDOM_FETCH_WEIGHT = 4
SELF = "corpus rows, own row left out"
NOISY = "corpus rows + noise at the median nearest-neighbour distance"
# the faiss ParameterSpace name of each knob (k_factor of an IndexRefine is "k_factor_rf")
FAISS_NAMES = {"efSearch": "efSearch", "nprobe": "nprobe", "k_factor": "k_factor_rf"}


@dataclass
class Tuning:
    """What tuning chose for one FAISS index, and what it measured."""

    params: dict[str, int]
    recall: float
    target: float
    queries: int
    met: bool
    k: int = K
    method: str = "measured"  # "exact": a Flat index, nothing to tune
    tried: list[dict] = field(default_factory=list)
    sample: str = ""  # how the sample queries were made (SELF or NOISY; "" for exact search)
    coarse: str | None = None  # an IVF index's coarse quantizer when tuned: "flat" or "HNSW32" (index/coarse.py)

    def record(self) -> dict:
        """The JSON stored per target under `search` in index_info.json."""
        return {
            "params": dict(self.params),
            "recall": round(float(self.recall), 4),
            "target": float(self.target),
            "k": int(self.k),
            "queries": int(self.queries),
            "met": bool(self.met),
            "method": self.method,
            "sample": self.sample,
            **({"coarse": self.coarse} if self.coarse else {}),
        }


# ----------------------------------------------------------------------------------------- index anatomy


def parts(index: Any) -> dict:
    """The pieces of an index that matter for its knobs and costs."""
    import faiss

    idx = faiss.downcast_index(index)
    out: dict[str, Any] = {"refine": None, "ivf": None, "hnsw": None, "base": idx}
    if isinstance(idx, faiss.IndexRefine):
        out["refine"] = faiss.downcast_index(idx.refine_index)
        idx = faiss.downcast_index(idx.base_index)
        out["base"] = idx
    while isinstance(idx, faiss.IndexPreTransform):
        idx = faiss.downcast_index(idx.index)
        out["base"] = idx
    if isinstance(idx, faiss.IndexHNSW):
        out["hnsw"] = idx
    out["ivf"] = coarse.ivf_of(idx)
    return out


def knobs(index: Any) -> list[str]:
    """The tunable query parameters of an index, main knob first (efSearch or nprobe), then k_factor."""
    p = parts(index)
    out = []
    if p["hnsw"] is not None:
        out.append("efSearch")
    elif p["ivf"] is not None:
        out.append("nprobe")
    if p["refine"] is not None:
        out.append("k_factor")
    return out


def is_exact(index: Any) -> bool:
    """True for a brute-force index (Flat): every answer is the exact one."""
    import faiss

    return isinstance(faiss.downcast_index(index), faiss.IndexFlat)


def _code_bytes(index: Any) -> float:
    try:
        return float(index.sa_code_size())
    except RuntimeError:
        return float(index.d * 4)


def cost(index: Any, params: dict[str, int], k: int = K) -> float:
    """Bytes touched per query by `params` (the cost model of the module docstring)."""
    p = parts(index)
    base = p["base"]
    total = 0.0
    if p["ivf"] is not None:
        ivf = p["ivf"]
        per_list = max(1.0, ivf.ntotal / max(1, ivf.nlist))
        nprobe = params.get("nprobe", int(ivf.nprobe))
        total += nprobe * per_list * _code_bytes(ivf) + coarse_cost(index, params)
    elif p["hnsw"] is not None:
        ef = max(params.get("efSearch", int(p["hnsw"].hnsw.efSearch)), k)
        storage = p["hnsw"].storage
        total += HNSW_DIST_PER_EF * ef * _code_bytes(storage) * RANDOM_FETCH_WEIGHT
    else:
        total += base.ntotal * _code_bytes(base)
    if p["refine"] is not None:
        total += k * params.get("k_factor", 1) * _code_bytes(p["refine"]) * RANDOM_FETCH_WEIGHT
    return total


def apply_params(index: Any, params: dict[str, int]) -> None:
    """Set tuned parameters on an index (names as stored: efSearch, nprobe, k_factor)."""
    import faiss

    ps = faiss.ParameterSpace()
    for name, value in params.items():
        ps.set_index_parameter(index, FAISS_NAMES.get(name, name), int(value))


def exact_scores(index: Any) -> bool:
    """True when the index returns exact inner products (exact vectors stored, or an exact re-ranking step)."""
    import faiss

    p = parts(index)
    if p["refine"] is not None:
        return isinstance(p["refine"], faiss.IndexFlat)
    base = p["base"]
    return isinstance(base, faiss.IndexFlat | faiss.IndexHNSWFlat | faiss.IndexIVFFlat)


def measure(
    index: Any,
    queries: np.ndarray,
    query_ids: np.ndarray | None,
    truth: np.ndarray,
    params: dict,
    truth_scores: np.ndarray | None = None,
    per_query: bool = False,
) -> Any:
    """recall@k of `index` searched with `params` against `truth` (self hits dropped as in the truth); with
    `per_query`, each query's recall."""
    k = truth.shape[1]
    apply_params(index, params)
    extra = 1 if query_ids is not None else 0
    scores, ids = index.search(np.ascontiguousarray(queries, dtype=np.float32), k + extra)
    ids, scores = drop_self(ids, scores, query_ids, k)
    exact = truth_scores is not None and exact_scores(index)
    per = recalls(ids, truth, scores, truth_scores) if exact else recalls(ids, truth)
    return per if per_query else (float(per.mean()) if len(per) else 1.0)


# ----------------------------------------------------------------------------------------- search


def _ladder(index: Any, knob: str) -> tuple[int, ...]:
    if knob == "efSearch":
        return EF_LADDER
    if knob == "nprobe":
        nlist = int(parts(index)["ivf"].nlist)
        return tuple(v for v in NPROBE_LADDER if v < nlist) + (nlist,)
    return K_FACTOR_LADDER


def _smallest_passing(
    ladder: tuple[int, ...], score: Callable[[int], float], target: float
) -> tuple[int | None, float]:
    """Bisection for the smallest ladder value whose score reaches target (scores taken as monotone): (value or
    None when even the largest misses, score at the value returned or at the largest)."""
    hi_score = score(ladder[-1])
    if hi_score < target:
        return None, hi_score
    lo, hi, best = 0, len(ladder) - 1, (ladder[-1], hi_score)
    while lo < hi:
        mid = (lo + hi) // 2
        s = score(ladder[mid])
        if s >= target:
            hi, best = mid, (ladder[mid], s)
        else:
            lo = mid + 1
    return best


def tune(
    index: Any,
    queries: np.ndarray,
    truth: np.ndarray,
    query_ids: np.ndarray | None = None,
    target: float = DEFAULT_TARGET,
    truth_scores: np.ndarray | None = None,
) -> Tuning:
    """The cheapest parameters of `index` reaching recall@k >= target on `queries` (truth: their exact top-k ids
    and scores, self hits dropped when `query_ids` are given). When no setting reaches it, the highest-recall
    setting tried, with met=False."""
    k = truth.shape[1]
    nq = len(queries)
    if is_exact(index):
        return Tuning({}, 1.0, target, 0, True, k, "exact")
    names = knobs(index)
    tried: list[dict] = []
    cache: dict[tuple, float] = {}
    means: dict[tuple, float] = {}

    def score(params: dict) -> float:
        """The sample's mean recall less one standard error: a setting passes when even that reaches the
        target, so new queries (another sample of the same kind) do not land just below it half the time."""
        key = tuple(sorted(params.items()))
        if key not in cache:
            per = measure(index, queries, query_ids, truth, params, truth_scores, per_query=True)
            means[key] = float(per.mean())
            cache[key] = means[key] - float(per.std(ddof=1) / np.sqrt(len(per))) if len(per) > 1 else means[key]
            tried.append({**params, "recall": round(means[key], 4), "lower": round(cache[key], 4)})
        return cache[key]

    main = names[0] if names and names[0] != "k_factor" else None
    refine = "k_factor" in names
    candidates: list[tuple[float, dict, float]] = []  # (cost, params, recall) of passing settings
    fallback: tuple[float, dict] = (-1.0, {})
    for kf in K_FACTOR_LADDER if refine else (None,):
        extra = {"k_factor": kf} if kf is not None else {}
        if candidates and cost(index, {**extra, **({main: 1} if main else {})}, k) >= min(c[0] for c in candidates):
            break  # a deeper re-rank alone already costs more than the best passing setting
        if main is None:
            r = score(extra)
            value = 0 if r >= target else None
        else:
            value, r = _smallest_passing(_ladder(index, main), lambda v, e=extra: score({main: v, **e}), target)
        params = {**({main: value} if main and value is not None else {}), **extra}
        if value is None:
            if r > fallback[0]:
                fallback = (r, {**({main: _ladder(index, main)[-1]} if main else {}), **extra})
            continue
        candidates.append((cost(index, params, k), params, r))
    if candidates:
        _, params, r = min(candidates, key=lambda c: c[0])
        met = True
    else:
        r, params = fallback
        met = False
    r = means.get(tuple(sorted(params.items())), r)  # record the mean; the bound only decided
    apply_params(index, params)
    result = Tuning(params, r, target, nq, met, k, "measured", tried)
    level = logging.INFO if met else logging.WARNING
    log.log(
        level,
        "tuned %s: %s -> recall@%d %.3f on %d sample queries (target %.2f%s)",
        type(index).__name__, params or "defaults", k, r, nq, target, "" if met else ", NOT reached",
    )  # fmt: skip
    return result


def tune_index(
    index: Any,
    queries: np.ndarray,
    truth: np.ndarray,
    query_ids: np.ndarray | None,
    target: float,
    truth_scores: np.ndarray | None,
    pick_coarse: bool = False,
) -> Tuning:
    """`tune`, and with `pick_coarse` the IVF coarse quantizer chosen as well (index/coarse.py): when a graph would
    read fewer centroids at the flat quantizer's tuned nprobe, the graph over the same centroids is tuned too and
    kept when it reaches the target at a lower cost. The index is left with the quantizer and parameters kept; the
    Tuning says which quantizer that is, and its `tried` holds both tunings."""
    flat = tune(index, queries, truth, query_ids, target, truth_scores)
    flat.coarse = coarse.kind(index)
    if not (pick_coarse and flat.met and coarse.graph_pays(index, flat.params)):
        return flat
    flat_cost = cost(index, flat.params)
    restore = coarse.swap(index, coarse.GRAPH)
    graph = tune(index, queries, truth, query_ids, target, truth_scores)
    graph.coarse = coarse.GRAPH
    graph_cost = cost(index, graph.params)
    keep = graph.met and graph_cost < flat_cost
    if not keep:
        restore()
        apply_params(index, flat.params)
    chosen = graph if keep else flat
    chosen.tried = [*(dict(t, coarse=r.coarse) for r in (flat, graph) for t in r.tried)]
    log.info(
        "coarse quantizer: %s (graph %s the target at %.0f KiB per query, flat %.0f KiB)",
        chosen.coarse, "reaches" if graph.met else "misses", graph_cost / 1024, flat_cost / 1024,
    )  # fmt: skip
    return chosen


def noisy_for(index: Any) -> bool:
    """Whether the sample queries of this index need noise (graphs) or can be corpus rows (the rest); see
    `tuning_queries`."""
    return parts(index)["hnsw"] is not None


def tuning_queries(
    index: Any, sample: np.ndarray, sample_ids: np.ndarray, chunks: Callable[[], Iterable[np.ndarray]], k: int
) -> tuple[np.ndarray, np.ndarray | None, np.ndarray, np.ndarray, str]:
    """(queries, their row ids or None, exact top-k ids, their scores, how they were made) for tuning `index`.

    A sample row is in the index; its own hit is dropped, which makes it a fair stand-in for a new query for IVF
    (30k x 256 synthetic, IVF256,Flat: recall 0.869 on corpus rows vs 0.869 on held-out points at nprobe 16,
    0.965 / 0.960 at 32). A graph search, though, enters the row's own node and finds its neighbours as that
    node's edges: HNSW32 scored 0.945 on corpus rows vs 0.903 held out at efSearch 32. For graphs the sample rows
    therefore get Gaussian noise whose norm is the median distance to their nearest neighbour: they leave the
    graph and score like new queries, a little below (0.880 vs 0.903 at efSearch 32, 0.940 vs 0.963 at 64,
    0.976 vs 0.988 at 128; 5k x 64: 0.969 vs 0.973 at 24). `chunks()` yields the corpus in row order, anew on
    each call (once for corpus rows, twice with noise)."""
    ids, scores = exact_neighbours(sample, chunks(), k, sample_ids)
    if not noisy_for(index):
        return sample, sample_ids, ids, scores, SELF
    nn = np.sqrt(np.maximum(0.0, 2.0 - 2.0 * scores[:, 0].astype(np.float64)))
    scale = float(np.median(nn)) / np.sqrt(sample.shape[1])
    rng = np.random.default_rng(1)
    noisy = sample + (scale * rng.standard_normal(sample.shape)).astype(np.float32)
    noisy = np.ascontiguousarray(noisy / np.linalg.norm(noisy, axis=1, keepdims=True), dtype=np.float32)
    ids, scores = exact_neighbours(noisy, chunks(), k)
    return noisy, None, ids, scores, NOISY


def sample_ids(n: int, n_queries: int = DEFAULT_QUERIES, seed: int = 0) -> np.ndarray:
    """The sorted row ids of the tuning sample (seeded, so a rebuild tunes on the same rows)."""
    m = min(n, n_queries)
    return np.sort(np.random.default_rng(seed).choice(n, m, replace=False)).astype(np.int64)


def tune_on_vectors(index: Any, vectors: np.ndarray, target: float = DEFAULT_TARGET, n_queries: int = DEFAULT_QUERIES,
                    k: int = K, pick_coarse: bool = False) -> Tuning:  # fmt: skip
    """Tune an index over in-memory `vectors` (the rows it holds, in order); with `pick_coarse`, choose an IVF
    index's coarse quantizer as `cxr index build` does for the default rule (index/coarse.py)."""
    ids = sample_ids(len(vectors), n_queries)
    kk = max(1, min(k, len(vectors) - 1))
    if is_exact(index):
        return Tuning({}, 1.0, target, 0, True, kk, "exact")
    chunks = [vectors[s : s + 65536] for s in range(0, len(vectors), 65536)]
    queries, qids, truth, scores, how = tuning_queries(index, vectors[ids], ids, lambda: chunks, kk)
    result = tune_index(index, queries, truth, qids, target, scores, pick_coarse)
    result.sample = how
    return result


def stored_vectors(index: Any) -> np.ndarray | None:
    """The exact vectors an index keeps (Flat, HNSW-Flat, the RFlat re-ranking store), else None."""
    import faiss

    idx = faiss.downcast_index(index)
    if isinstance(idx, faiss.IndexRefine):
        idx = faiss.downcast_index(idx.refine_index)
    if isinstance(idx, faiss.IndexHNSWFlat):
        idx = faiss.downcast_index(idx.storage)
    if isinstance(idx, faiss.IndexFlat):
        return idx.reconstruct_n(0, idx.ntotal)
    return None
