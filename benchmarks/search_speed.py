"""Search speed: queries/s, p50/p99 latency, recall@10 and memory for each index type, against numpy brute force.

    python -m benchmarks.search_speed --sizes 10000 100000
    python -m benchmarks.search_speed --sizes 1000000 --append      # adds the 1M rows to the same results file

Vectors are synthetic, dim 512 (BiomedCLIP's embedding size), L2-normalised, with the eigenvalue decay of real
embeddings (see SPECTRUM_ALPHA); queries are held-out points of the same distribution.
The naive baseline is numpy brute force (matrix product + argpartition) in the same run. The indexes are made the
way `index/` makes them (`index.factory.make_index` / `train_index` / `train_size`, inner product) and searched
through the project's backends (`index.backends.FaissBackend`, and `TorchBackend` on the CPU as "exact torch"); the
torch backend on CUDA runs where torch sees a GPU. OMP_WAIT_POLICY defaults to PASSIVE: faiss's OpenMP threads
spin-wait otherwise, which is catastrophically slow on a machine shared with other busy processes.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before faiss/torch load libgomp

import argparse  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

from benchmarks import search_levers  # noqa: E402
from benchmarks.common import RESULTS, current_rss_mib, markdown_table, time_calls, write_results  # noqa: E402

K = 10


# The synthetic vectors' eigenvalues fall as i^-alpha, with alpha chosen so that their effective dimension (the
# participation ratio (sum lambda)^2 / sum lambda^2 of the covariance) equals that of real embeddings: the centred,
# L2-normalised all-MiniLM-L6-v2 features of the IU X-ray reports, 39.5 (`python -m benchmarks.search_speed
# --fit-spectrum DIR`, DIR = a trained demo model folder with its text_features.safetensors). Uniform random
# vectors on the 511-sphere (alpha = 0, effective dimension 512) are the worst case for every ANN index and unlike
# any embedding; `--spectrum-alpha 0` still runs them.
SPECTRUM_ALPHA = 0.93


def participation_ratio(lam: np.ndarray) -> float:
    return float(lam.sum() ** 2 / (lam**2).sum())


def fit_spectrum(features: np.ndarray, dim: int = 512) -> tuple[float, float]:
    """(effective dimension of the centred, L2-normalised features; the alpha whose i^-alpha spectrum over `dim`
    components has the same effective dimension), by bisection."""
    x = features / np.linalg.norm(features, axis=1, keepdims=True)
    x = x - x.mean(axis=0)
    target = participation_ratio(np.linalg.eigvalsh(x.T @ x / len(x)))
    ranks = np.arange(1, dim + 1, dtype=np.float64)
    lo, hi = 0.0, 4.0
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if participation_ratio(ranks**-mid) > target else (lo, mid)
    return target, (lo + hi) / 2


def embedding_like_vectors(n: int, dim: int, alpha: float, seed: int, rotation_seed: int = 0) -> np.ndarray:
    """Gaussian points whose covariance eigenvalues fall as i^-alpha (in a random orthonormal basis shared by all
    calls with the same `rotation_seed`), L2-normalised, float32: a stand-in for real embeddings."""
    rot = np.linalg.qr(np.random.default_rng(rotation_seed).standard_normal((dim, dim)))[0].astype(np.float32)
    scale = (np.arange(1, dim + 1, dtype=np.float32) ** (-alpha / 2)).astype(np.float32)
    rng = np.random.default_rng(seed)
    out = np.empty((n, dim), dtype=np.float32)
    step = 100_000
    for s in range(0, n, step):
        e = min(n, s + step)
        out[s:e] = (rng.standard_normal((e - s, dim), dtype=np.float32) * scale) @ rot
    out /= np.linalg.norm(out, axis=1, keepdims=True)
    return out


def numpy_search(base: np.ndarray, queries: np.ndarray, k: int, chunk: int = 128) -> np.ndarray:
    """The naive way: full score matrix, argpartition, sort the top k."""
    out = np.empty((len(queries), k), dtype=np.int64)
    for s in range(0, len(queries), chunk):
        scores = queries[s : s + chunk] @ base.T
        top = np.argpartition(-scores, k, axis=1)[:, :k]
        order = np.argsort(-np.take_along_axis(scores, top, axis=1), axis=1)
        out[s : s + chunk] = np.take_along_axis(top, order, axis=1)
    return out


def recall_at_k(found: np.ndarray, truth: np.ndarray) -> float:
    """Mean fraction of the true top-k found in the returned top-k."""
    return float(np.mean([len(set(f) & set(t)) / len(t) for f, t in zip(found, truth, strict=True)]))


def measure(search, queries: np.ndarray, truth: np.ndarray, budget_s: float, batch: int = 1024) -> dict:
    """Batch-1 latency percentiles (as many single queries as fit in budget_s, 5 to 500) and batch throughput."""
    t0 = time.perf_counter()
    search(queries[:1])
    one = time.perf_counter() - t0
    n_single = int(max(5, min(500, budget_s / max(one, 1e-6))))
    lat = np.array([time_calls(lambda q=queries[i : i + 1]: search(q), repeat=1, warmup=0)[0] for i in range(n_single)])
    big = queries[:batch]
    t0 = time.perf_counter()
    found = search(big)
    batch_s = time.perf_counter() - t0
    return {
        "p50_ms_b1": float(np.percentile(lat, 50) * 1e3),
        "p99_ms_b1": float(np.percentile(lat, 99) * 1e3),
        "qps_b1": float(1.0 / lat.mean()),
        "qps_b1024": float(len(big) / batch_s),
        "recall@10": recall_at_k(found, truth[: len(big)]),
        "single_queries_timed": n_single,
    }


def backend_searcher(backend):
    """A search function returning ids only, through an `index.search` backend."""

    def search(q: np.ndarray) -> np.ndarray:
        return backend.search(q, K)[1]

    return search


def numpy_searcher(base: np.ndarray):
    def search(q: np.ndarray) -> np.ndarray:
        return numpy_search(base, q, K)

    return search


def build(factory: str, base: np.ndarray, ef_construction: int | None = None, kmeans_iters: int | None = None):
    """Build an index the way index/ does; returns (index, build seconds, RSS growth in MiB)."""
    import faiss

    from index.factory import make_index, train_index, train_size

    rss0 = current_rss_mib()
    t0 = time.perf_counter()
    index = make_index(factory, base.shape[1])
    if ef_construction is not None:
        faiss.downcast_index(index).hnsw.efConstruction = ef_construction
    if not index.is_trained:
        if kmeans_iters is not None:
            faiss.extract_index_ivf(index).cp.niter = kmeans_iters
        n = train_size(index, len(base))
        rng = np.random.default_rng(0)
        train_index(index, base[np.sort(rng.choice(len(base), n, replace=False))], factory)
    for s in range(0, len(base), 100_000):
        index.add(base[s : s + 100_000])
    return index, time.perf_counter() - t0, current_rss_mib() - rss0


def _fmt(params: dict) -> str:
    return " ".join(f"{k}={v}" for k, v in params.items())


def work(index, queries: np.ndarray, ef_params: dict) -> dict:
    """Work per query at the current parameters: distance computations (HNSW) or codes scanned (IVF) on 256
    queries, plus the exact re-ranking fetches, and the bytes they touch."""
    import faiss

    from index import tune

    parts = tune.parts(index)
    q = np.ascontiguousarray(queries[:256])
    if parts["hnsw"] is not None:
        faiss.cvar.hnsw_stats.reset()
        index.search(q, K)
        ndis = faiss.cvar.hnsw_stats.ndis / len(q)
        code = parts["hnsw"].storage.sa_code_size()
    elif parts["ivf"] is not None:
        faiss.cvar.indexIVF_stats.reset()
        index.search(q, K)
        ndis = faiss.cvar.indexIVF_stats.ndis / len(q)
        code = parts["ivf"].sa_code_size()
    else:
        return {}
    out = {"dist_per_query": ndis, "kib_per_query": ndis * code / 1024}
    if parts["refine"] is not None:
        rerank = K * ef_params.get("k_factor", 1)
        out["reranked_per_query"] = rerank
        out["kib_per_query"] += rerank * parts["refine"].sa_code_size() / 1024
    return out


def add_tuned(add, index, factory, base, queries, truth, budget_s, build_s, mem, target, is_default, label=""):
    """Tune `index` on a sample of its own vectors as `cxr index build` does, then measure the held-out queries at
    the tuned parameters: the recall a user gets with no flags. Returns the tuning."""
    from index import tune
    from index.backends import FaissBackend

    t0 = time.perf_counter()
    t = tune.tune_on_vectors(index, base, target, pick_coarse=is_default)  # the build's choice of quantizer too
    tune_s = time.perf_counter() - t0
    r = measure(backend_searcher(FaissBackend(index)), queries, truth, budget_s)
    r.update(work(index, queries, ef_params=t.params))
    r.update({"sample_recall": t.recall, "tune_s": tune_s})
    what = "DEFAULT: rule + tuning" if is_default else "tuned"
    what += f"; {label}" if label else ""
    coarse = f" coarse={t.coarse}" if t.coarse else ""
    add(f"faiss {factory} ({what})", _fmt(t.params) + coarse + ("" if t.met else " (target missed)"), build_s, mem, r)
    return t


def run(
    n: int,
    dim: int,
    budget_s: float,
    ef_construction: int,
    log,
    compare_blas: bool = False,
    default_threshold: int = 20,
    ef_search: tuple[int, ...] = (16, 32, 64, 128, 256),
    ivf: bool = False,
    alpha: float = SPECTRUM_ALPHA,
    target: float = 0.95,
    rerank_grid: bool = True,
    data: tuple[np.ndarray, np.ndarray, str] | None = None,
    hnsw: bool = True,
    refines: tuple[str, ...] = ("RFlat", "Refine(SQ8)"),
    levers: bool = False,
    torch_exact: bool = True,
    hnsw_tune: bool = True,
    on_row=None,
    exact_device: str | None = None,
) -> list[dict]:
    """Every method at one corpus size."""
    import faiss
    import torch

    from index import tune
    from index.backends import FaissBackend, TorchBackend
    from index.factory import choose_factory, fastscan_m, memory_bytes, nlist_for

    rows: list[dict] = []
    label = data[2] if data is not None else f"synthetic (alpha {alpha:g})"

    def add(method: str, params: str, build_s: float, mem: float, r: dict) -> None:
        row = {"n": n, "data": label, "method": method, "params": params, "build_s": build_s, "mem_mib": mem, **r}
        row["load_1min"] = round(os.getloadavg()[0], 1)
        row.update(search_levers.bound(row))
        rows.append(row)
        log(rows[-1])
        if on_row is not None:
            on_row(rows)

    if data is not None:
        base, queries = data[0], data[1]
        dim = base.shape[1]
    else:
        base = embedding_like_vectors(n, dim, alpha, seed=0)
        queries = embedding_like_vectors(2048, dim, alpha, seed=1)  # held-out points of the same distribution
    t0 = time.perf_counter()
    truth = numpy_search(base, queries[:1024], K)
    log(f"n={n:,}: data and exact truth ready ({time.perf_counter() - t0:.0f} s for the truth)")
    base_mib = base.nbytes / 2**20

    add("numpy brute force (naive)", "", 0.0, base_mib, measure(numpy_searcher(base), queries, truth, budget_s))

    if torch_exact:
        backend = TorchBackend(base, device="cpu")
        add("exact torch (TorchBackend, CPU)", "", 0.0, base_mib, measure(backend_searcher(backend), queries, truth,
                                                                          budget_s))  # fmt: skip
        del backend

    default_factory = choose_factory(n, dim)
    flat, bs, _ = build("Flat", base)
    add(
        "faiss Flat (FaissBackend" + (", DEFAULT: rule, exact)" if default_factory == "Flat" else ")"),
        "",
        bs,
        base_mib,
        measure(backend_searcher(FaissBackend(flat)), queries, truth, budget_s),
    )
    del flat

    nlist = nlist_for(n)
    for refine in refines:
        factory = f"IVF{nlist},PQ{fastscan_m(dim)}x4fs,{refine}"
        index, bs, _ = build(factory, base)
        mem = memory_bytes(factory, n, dim) / 2**20
        log(f"n={n:,}: {factory} built in {bs:.0f} s")
        if rerank_grid and refine == "RFlat":
            for nprobe in (16, 32, 64, 128):
                for kf in (4, 16):
                    params = {"nprobe": min(nprobe, nlist), "k_factor": kf}
                    tune.apply_params(index, params)
                    r = measure(backend_searcher(FaissBackend(index)), queries, truth, budget_s)
                    r.update(work(index, queries, ef_params=params))
                    add(f"faiss {factory} (fixed)", _fmt(params), bs, mem, r)
        t = add_tuned(add, index, factory, base, queries, truth, budget_s, bs, mem, target, default_factory == factory)
        if levers and factory == default_factory:
            search_levers.lever_rows(
                add, index, factory, base,
                lambda ix, f, label, b, m: add_tuned(add, ix, f, base, queries, truth, budget_s, b, m, target, False,
                                                     label),
                lambda ix, params: {**measure(backend_searcher(FaissBackend(ix)), queries, truth, budget_s),
                                    **work(ix, queries, ef_params=params)},
                t.params, faiss.omp_get_max_threads(),
            )  # fmt: skip
        del index

    if hnsw:
        index, bs, _ = build("HNSW32,Flat", base, ef_construction=ef_construction)
        g = faiss.downcast_index(index).hnsw
        mem = (base.nbytes + g.neighbors.size() * 4 + g.levels.size() * 4 + g.offsets.size() * 8) / 2**20
        log(f"n={n:,}: HNSW32 built in {bs:.0f} s ({n / bs:.0f} vectors/s)")
        for ef in ef_search:
            faiss.ParameterSpace().set_index_parameter(index, "efSearch", ef)
            r = measure(backend_searcher(FaissBackend(index)), queries, truth, budget_s)
            r.update(work(index, queries, ef_params={"efSearch": ef}))
            add("faiss HNSW32,Flat (plain, fixed efSearch)", f"efC={ef_construction} efSearch={ef}", bs, mem, r)
        if hnsw_tune:
            add_tuned(add, index, "HNSW32,Flat", base, queries, truth, budget_s, bs, mem, target,
                      default_factory == "HNSW32,Flat")  # fmt: skip
        del index

    if ivf:  # the old rule's IVF-PQ without re-ranking (before issue 15), for comparison
        factory = f"IVF{nlist},PQ{dim // 8}"
        if compare_blas:  # before/after: faiss 1.15's default BLAS threshold vs 20 for the k-means of IVF-PQ training
            for th in (default_threshold, 20):
                faiss.cvar.distance_compute_blas_threshold = th
                _, secs, _ = build(factory, base, kmeans_iters=10)
                rows.append(
                    {
                        "n": n,
                        "method": f"faiss {factory} build",
                        "params": f"distance_compute_blas_threshold={th}",
                        "build_s": secs,
                    }
                )
                log(rows[-1])
            faiss.cvar.distance_compute_blas_threshold = 20
        ivf, bs, _ = build(factory, base, kmeans_iters=10)
        log(f"n={n:,}: {factory} built in {bs:.0f} s")
        code_mib = ivf.sa_code_size() * n / 2**20
        for nprobe in (8, 32, 128):
            faiss.ParameterSpace().set_index_parameter(ivf, "nprobe", nprobe)
            add(
                f"faiss {factory} (old rule, no re-rank)",
                f"nprobe={nprobe}",
                bs,
                code_mib,
                measure(backend_searcher(FaissBackend(ivf)), queries, truth, budget_s),
            )
        del ivf

    exact_device = exact_device or ("cuda" if torch.cuda.is_available() else None)
    if exact_device:  # the GPU rows (a CPU device runs the same path: the GPU check's dry run)
        where = "GPU" if exact_device.startswith("cuda") else exact_device
        for prec in ("fp32", "bf16"):
            add(
                f"exact torch (TorchBackend, {where} {prec})",
                "",
                0.0,
                base_mib * (0.5 if prec == "bf16" else 1),
                measure(backend_searcher(TorchBackend(base, exact_device, prec)), queries, truth, budget_s),
            )
    return rows


def summary(rows: list[dict]) -> str:
    """Per size and data set: exact search against numpy, what the default (rule + tuning) gives with no flags, and
    the fastest single-query setting at recall@10 >= 0.95 against Flat."""
    lines = []
    for n, label in sorted({(r["n"], r.get("data", "")) for r in rows}):
        at = [r for r in rows if r["n"] == n and r.get("data", "") == label]
        for r in at:
            if r["method"].endswith(" build"):
                lines.append(f"- n={n:,}: {r['method']} with {r['params']}: {r['build_s']:.1f} s")
        naive = next((r for r in at if r["method"].startswith("numpy")), None)
        flat = next((r for r in at if r["method"].startswith("faiss Flat")), None)
        if naive is None or flat is None:  # a run still in progress
            continue
        load = sorted(r["load_1min"] for r in at if "load_1min" in r)
        msg = (
            f"- **n={n:,}, {label}** (1-min load {load[0]}-{load[-1]}): faiss Flat "
            f"{flat['qps_b1'] / naive['qps_b1']:.1f}x numpy's queries/s at batch 1, "
            f"{flat['qps_b1024'] / naive['qps_b1024']:.1f}x at batch 1024."
        )
        for r in at:
            if r["method"].startswith("exact torch (TorchBackend, GPU"):
                msg += (
                    f" {r['method'].split(', ')[1].rstrip(')')}: {r['qps_b1'] / flat['qps_b1']:.1f}x Flat at batch 1 "
                    f"(p50 {r['p50_ms_b1']:.3f} ms), {r['qps_b1024'] / flat['qps_b1024']:.1f}x at batch 1024 "
                    f"({r['qps_b1024']:,.0f} queries/s), recall@10 {r['recall@10']:.3f}."
                )
        default = next((r for r in at if "DEFAULT" in r["method"]), None)
        if default:
            msg += (
                f" Default ({default['method'].split(' (')[0].replace('faiss ', '')}, {default['params'] or 'exact'}): "
                f"recall@10 {default['recall@10']:.3f} on held-out queries, {default['qps_b1'] / flat['qps_b1']:.0f}x "
                f"Flat at batch 1 (p50 {default['p50_ms_b1']:.2f} ms), "
                f"{default['qps_b1024'] / flat['qps_b1024']:.1f}x at batch 1024."
            )
        ok = [
            r
            for r in at
            if r.get("recall@10", 0) >= 0.95 and not r["method"].startswith(("numpy", "exact", "faiss Flat"))
        ]
        best = max(ok, key=lambda r: r["qps_b1"]) if ok else None
        if best:
            msg += (
                f" Fastest at recall >= 0.95: {best['method'].replace('faiss ', '')} {best['params']}, "
                f"{best['qps_b1'] / flat['qps_b1']:.0f}x Flat (p50 {best['p50_ms_b1']:.2f} ms, recall "
                f"{best['recall@10']:.3f})."
            )
        lines.append(msg)
    return "\n".join(lines) + "\n"


COLUMNS = [
    "n",
    "data",
    "method",
    "params",
    "qps_b1",
    "p50_ms_b1",
    "p99_ms_b1",
    "qps_b1024",
    "recall@10",
    "sample_recall",
    "dist_per_query",
    "reranked_per_query",
    "kib_per_query",
    "mem_mib",
    "build_s",
    "tune_s",
    "ns_per_code_b1",
    "load_1min",
]


def real_vectors(index_dir: str, n: int, n_queries: int = 2048, seed: int = 0) -> tuple[np.ndarray, np.ndarray, str]:
    """A real index's image and report vectors (read-only), tiled with small noise to `n`, and held-out queries
    drawn the same way. The noise norm is the median distance between a real vector and its nearest other real
    vector, so copies of one vector are no closer to each other than real neighbours are."""
    import faiss

    from index.store import resolve

    gen = resolve(index_dir).gen_dir
    parts = [faiss.read_index(str(gen / name)) for name in ("images.faiss", "reports.faiss")]
    real = np.concatenate([p.reconstruct_n(0, p.ntotal) for p in parts]).astype(np.float32)
    real = np.unique(real, axis=0)  # a study's report is stored once per image
    sims = real @ real.T
    np.fill_diagonal(sims, -np.inf)
    nn = np.sqrt(np.maximum(0.0, 2 - 2 * sims.max(axis=1)))
    scale = float(np.median(nn)) / np.sqrt(real.shape[1])
    rng = np.random.default_rng(seed)

    def draw(m: int) -> np.ndarray:
        x = real[rng.integers(0, len(real), m)] + scale * rng.standard_normal((m, real.shape[1]), dtype=np.float32)
        return np.ascontiguousarray(x / np.linalg.norm(x, axis=1, keepdims=True), dtype=np.float32)

    label = f"real: {len(real):,} demo vectors (d {real.shape[1]}) tiled, noise {scale * np.sqrt(real.shape[1]):.3f}"
    return draw(n), draw(n_queries), label


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", type=int, nargs="*", default=[10_000, 100_000, 1_000_000])
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--budget", type=float, default=3.0, help="seconds of single queries per configuration")
    p.add_argument("--ef-construction", type=int, default=40, help="HNSW build effort (faiss default 40)")
    p.add_argument("--ef-search", type=int, nargs="+", default=[16, 32, 64, 128, 256])
    p.add_argument("--target-recall", type=float, default=0.95, help="what the tuned rows tune to")
    p.add_argument("--old-ivf", action="store_true", help="also the old rule's IVF-PQ without re-ranking")
    p.add_argument("--no-hnsw", action="store_true", help="skip plain HNSW (its build at 1M is long on 2 cores)")
    p.add_argument("--no-grid", action="store_true", help="skip the fixed nprobe x k_factor grid of IVF-PQ-RFlat")
    p.add_argument("--refines", nargs="*", default=["RFlat", "Refine(SQ8)"], help="re-ranking steps of IVF-PQ")
    p.add_argument("--levers", action="store_true", help="also the default IVF's levers (benchmarks/search_levers.py)")
    p.add_argument("--no-torch", action="store_true", help="skip exact torch on the CPU")
    p.add_argument("--exact-device", help="device of the exact torch rows (default: cuda when torch sees one)")
    p.add_argument("--no-hnsw-tune", action="store_true", help="plain HNSW at fixed efSearch only (no tuned row)")
    p.add_argument("--real-index", metavar="DIR", help="an index folder whose vectors are tiled for the real rows")
    p.add_argument("--real-n", type=int, default=100_000, help="how many tiled real vectors")
    p.add_argument("--threads", type=int, default=None, help="faiss/torch threads (default: all cores)")
    p.add_argument(
        "--blas-threshold",
        type=int,
        default=20,
        help="faiss.cvar.distance_compute_blas_threshold (faiss 1.15 ships a huge one: slow PQ training)",
    )
    p.add_argument(
        "--compare-blas",
        action="store_true",
        help="at the first size, build IVF-PQ with faiss's default threshold and with --blas-threshold",
    )
    p.add_argument(
        "--spectrum-alpha",
        type=float,
        default=SPECTRUM_ALPHA,
        help="eigenvalue decay of the synthetic vectors (0: uniform on the sphere, the worst case)",
    )
    p.add_argument("--fit-spectrum", metavar="MODEL_DIR", help="print alpha fitted on a model's stored text features")
    p.add_argument("--append", action="store_true", help="keep rows of other sizes/data already in the results file")
    p.add_argument("--name", default="search_speed_cpu")
    a = p.parse_args(argv)
    argv = sys.argv[1:] if argv is None else argv
    if a.fit_spectrum:
        from safetensors.torch import load_file

        from retrieval.models.text_features import STORE_FILE

        feats = load_file(str(Path(a.fit_spectrum) / STORE_FILE))["features"].numpy()
        eff, alpha = fit_spectrum(feats, a.dim)
        print(f"effective dimension {eff:.1f} over {len(feats):,} texts of dim {feats.shape[1]}: alpha = {alpha:.3f}")
        return
    import faiss
    import torch

    threads = a.threads or os.cpu_count() or 1
    default_threshold = faiss.cvar.distance_compute_blas_threshold
    faiss.cvar.distance_compute_blas_threshold = a.blas_threshold
    faiss.omp_set_num_threads(threads)
    torch.set_num_threads(threads)
    runs: list[tuple[int, tuple | None]] = [(n, None) for n in a.sizes]
    if a.real_index:
        runs.append((a.real_n, "real"))
    rows: list[dict] = []
    old = RESULTS / f"{a.name}.json"
    if a.append and old.exists():
        real = bool(a.real_index)
        rows = [
            r
            for r in json.loads(old.read_text())["rows"]
            if not (r.get("data", "").startswith("real") and real)
            and not (not r.get("data", "").startswith("real") and r["n"] in a.sizes)
        ]
    cmd = " ".join(["python -m benchmarks.search_speed"] + argv)
    t_start = time.perf_counter()

    def log(x: object) -> None:
        print(f"[{time.perf_counter() - t_start:7.1f} s] {x}", flush=True)

    def save(done: list[dict], partial: list[dict] | None = None) -> str:
        every = sorted(done + (partial or []), key=lambda r: (r.get("data", "").startswith("real"), r["n"]))
        md = summary(every) + "\n" + markdown_table(every, COLUMNS)
        result = {
            "dim": a.dim,
            "k": K,
            "threads": threads,
            "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
            "faiss_default_blas_threshold": default_threshold,
            "blas_threshold": a.blas_threshold,
            "ef_construction": a.ef_construction,
            "ef_search": a.ef_search,
            "spectrum_alpha": a.spectrum_alpha,
            "target_recall": a.target_recall,
            "rows": every,
        }
        write_results(a.name, result, md, cmd)  # after every row, so a long run keeps what it has
        return md

    for n, kind in runs:
        data = real_vectors(a.real_index, n) if kind == "real" else None
        rows += run(
            n,
            a.dim,
            a.budget,
            a.ef_construction,
            log,
            a.compare_blas and n == a.sizes[0],
            default_threshold,
            tuple(a.ef_search),
            a.old_ivf,
            a.spectrum_alpha,
            a.target_recall,
            not a.no_grid,
            data,
            not a.no_hnsw,
            tuple(a.refines),
            a.levers,
            not a.no_torch,
            not a.no_hnsw_tune,
            lambda partial: save(rows, partial),
            a.exact_device,
        )
        print(save(rows), flush=True)


if __name__ == "__main__":
    main()
