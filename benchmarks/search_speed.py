"""Search speed: queries/s, p50/p99 latency, recall@10 and memory for each index type, against numpy brute force.

    python -m benchmarks.search_speed --sizes 10000 100000 1000000

Vectors are synthetic, clustered (as real embeddings are) and L2-normalised, dim 512 (BiomedCLIP's embedding size).
The naive baseline is numpy brute force (matrix product + argpartition) in the same run. The index types are built the
way `index/` builds them (faiss index_factory, inner product); the torch CUDA backend runs where torch sees a GPU.
"""

from __future__ import annotations

import argparse
import time

import faiss
import numpy as np
import torch

from benchmarks.common import current_rss_mib, markdown_table, time_calls, write_results

K = 10


def clustered_vectors(n: int, dim: int, n_centers: int, seed: int) -> np.ndarray:
    """Points around random centres, L2-normalised, float32: a stand-in for real embeddings."""
    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((n_centers, dim), dtype=np.float32)
    out = np.empty((n, dim), dtype=np.float32)
    step = 100_000
    for s in range(0, n, step):
        e = min(n, s + step)
        idx = rng.integers(0, n_centers, e - s)
        out[s:e] = centers[idx] + 0.9 * rng.standard_normal((e - s, dim), dtype=np.float32)
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
    return float(np.mean([len(set(f) & set(t)) / len(t) for f, t in zip(found, truth, strict=True)]))


def measure(search, queries: np.ndarray, truth: np.ndarray, budget_s: float) -> dict:
    """Batch-1 latency percentiles and batch-1024 throughput for one search function."""
    # batch 1: as many single queries as fit in the time budget (at least 5)
    t0 = time.perf_counter()
    search(queries[:1])
    one = time.perf_counter() - t0
    n_single = int(max(5, min(500, budget_s / max(one, 1e-6))))
    lat = np.array([time_calls(lambda q=queries[i : i + 1]: search(q), repeat=1, warmup=0)[0] for i in range(n_single)])
    batch = queries[:1024]
    t0 = time.perf_counter()
    found = search(batch)
    batch_s = time.perf_counter() - t0
    return {
        "p50_ms_b1": float(np.percentile(lat, 50) * 1e3),
        "p99_ms_b1": float(np.percentile(lat, 99) * 1e3),
        "qps_b1": float(1.0 / lat.mean()),
        "qps_b1024": float(len(batch) / batch_s),
        "recall@10": recall_at_k(found, truth[: len(batch)]),
        "single_queries_timed": n_single,
    }


def faiss_searcher(index: faiss.Index):
    def search(q: np.ndarray) -> np.ndarray:
        return index.search(q, K)[1]

    return search


def torch_searcher(base: np.ndarray, device: str, dtype: torch.dtype):
    """Exact search as one matmul + top-k on a torch device (the index's GPU backend)."""
    xb = torch.from_numpy(base).to(device=device, dtype=dtype)

    def search(q: np.ndarray) -> np.ndarray:
        qt = torch.from_numpy(q).to(device=device, dtype=dtype)
        idx = torch.topk(qt @ xb.T, K, dim=1).indices
        return idx.cpu().numpy()

    return search


def build(factory: str, base: np.ndarray, train_n: int) -> tuple[faiss.Index, float, float]:
    """Build a faiss index by factory string; returns it with build seconds and RSS growth in MiB."""
    rss0 = current_rss_mib()
    t0 = time.perf_counter()
    index = faiss.index_factory(base.shape[1], factory, faiss.METRIC_INNER_PRODUCT)
    if not index.is_trained:
        rng = np.random.default_rng(0)
        sample = base[rng.choice(len(base), min(train_n, len(base)), replace=False)]
        index.train(sample)
    index.add(base)
    return index, time.perf_counter() - t0, current_rss_mib() - rss0


def run(sizes: list[int], dim: int, budget_s: float) -> dict:
    rows = []
    rng = np.random.default_rng(1)
    for n in sizes:
        base = clustered_vectors(n, dim, n_centers=max(100, n // 500), seed=0)
        queries = clustered_vectors(2048, dim, n_centers=max(100, n // 500), seed=0)  # same centres, new points
        queries = (queries + 0.05 * rng.standard_normal(queries.shape, dtype=np.float32)).astype(np.float32)
        queries /= np.linalg.norm(queries, axis=1, keepdims=True)
        truth = numpy_search(base, queries[:1024], K)
        base_mib = base.nbytes / 2**20

        r = measure(lambda q: numpy_search(base, q, K), queries, truth, budget_s)
        rows.append({"n": n, "method": "numpy brute force", "params": "", "build_s": 0.0, "mem_mib": base_mib, **r})

        flat, bs, mem = build("Flat", base, 0)
        r = measure(faiss_searcher(flat), queries, truth, budget_s)
        rows.append({"n": n, "method": "faiss Flat (CPU)", "params": "", "build_s": bs, "mem_mib": base_mib, **r})
        del flat

        hnsw, bs, mem = build("HNSW32,Flat", base, 0)
        hnsw_mem = mem
        for ef in (16, 32, 64, 128, 256):
            faiss.ParameterSpace().set_index_parameter(hnsw, "efSearch", ef)
            r = measure(faiss_searcher(hnsw), queries, truth, budget_s)
            rows.append({"n": n, "method": "faiss HNSW32 (CPU)", "params": f"efSearch={ef}", "build_s": bs,
                         "mem_mib": hnsw_mem, **r})
        del hnsw

        nlist = int(min(4096, max(16, 4 * np.sqrt(n) // 16 * 16)))
        ivf, bs, mem = build(f"IVF{nlist},PQ{dim // 8}", base, train_n=min(n, 64 * nlist))
        for nprobe in (8, 32, 128):
            faiss.ParameterSpace().set_index_parameter(ivf, "nprobe", nprobe)
            r = measure(faiss_searcher(ivf), queries, truth, budget_s)
            rows.append({"n": n, "method": f"faiss IVF{nlist},PQ{dim // 8} (CPU)", "params": f"nprobe={nprobe}",
                         "build_s": bs, "mem_mib": ivf.sa_code_size() * n / 2**20, **r})
        del ivf

        if torch.cuda.is_available():
            for dt in (torch.float32, torch.bfloat16):
                r = measure(torch_searcher(base, "cuda", dt), queries, truth, budget_s)
                rows.append({"n": n, "method": f"torch exact (GPU, {str(dt)[6:]})", "params": "", "build_s": 0.0,
                             "mem_mib": base_mib * (0.5 if dt == torch.bfloat16 else 1), **r})
        print(markdown_table([x for x in rows if x["n"] == n]), flush=True)
    return {"dim": dim, "k": K, "rows": rows}


def summary(rows: list[dict]) -> str:
    """Speed-ups against numpy at each size, and the HNSW target check (recall >= 0.95 at >= 50x Flat)."""
    lines = []
    for n in sorted({r["n"] for r in rows}):
        at = [r for r in rows if r["n"] == n]
        naive = next(r for r in at if r["method"] == "numpy brute force")
        flat = next(r for r in at if r["method"] == "faiss Flat (CPU)")
        ok = [r for r in at if r["method"].startswith("faiss HNSW") and r["recall@10"] >= 0.95]
        best = max(ok, key=lambda r: r["qps_b1"]) if ok else None
        msg = f"- n={n:,}: faiss Flat b1 {flat['qps_b1'] / naive['qps_b1']:.1f}x numpy, b1024 " \
              f"{flat['qps_b1024'] / naive['qps_b1024']:.1f}x numpy."
        if best:
            msg += f" HNSW at recall@10 {best['recall@10']:.3f} ({best['params']}): " \
                   f"{best['qps_b1'] / flat['qps_b1']:.0f}x Flat's queries/s at batch 1, " \
                   f"{best['qps_b1024'] / flat['qps_b1024']:.1f}x at batch 1024."
        lines.append(msg)
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--budget", type=float, default=3.0, help="seconds of single queries per configuration")
    p.add_argument("--name", default="search_speed_cpu")
    a = p.parse_args()
    faiss.omp_set_num_threads(torch.get_num_threads())
    result = run(a.sizes, a.dim, a.budget)
    cols = ["n", "method", "params", "qps_b1", "p50_ms_b1", "p99_ms_b1", "qps_b1024", "recall@10", "mem_mib",
            "build_s"]
    md = summary(result["rows"]) + "\n" + markdown_table(result["rows"], cols)
    cmd = "python -m benchmarks.search_speed --sizes " + " ".join(map(str, a.sizes))
    print(md)
    print(write_results(a.name, result, md, cmd))


if __name__ == "__main__":
    main()
