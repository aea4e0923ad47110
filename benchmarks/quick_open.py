"""Quick opens and bit flips (issue 29, item 3): does a quick-opened index ever serve a changed answer, and what
does the background hash cost?

A quick open is what a generation above `FULL_HASH_AT_OPEN` (256 MiB) or any `--mmap` open gets: sizes, schema,
structure and the first and last 64 KiB of each file at open, and (since issue 29) the full sha256 of the FAISS
files in a background thread that every search waits for. Here FULL_HASH_AT_OPEN is set to 0 so that small
indexes take that path.

* Flips: N random single-bit flips in images.faiss and in reports.faiss of Flat, HNSW and IVF (opened with
  --mmap) indexes; each trial opens the index the quick way and runs 8 queries on the flipped file's target.
  Counted: caught at open, caught before the first answer (the background hash), and answers served that differ
  from the pristine index's. The baseline in the same run is the quick open without the background hash (what
  opened above the limit before; `open_index(full=False)`).
* Cost: at rows x dim, the median time to the first answer (open + one query) for the full hash at open, the quick
  open with its background hash, and the quick open without it.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks.common import markdown_table, write_results

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO / "tests" / "helpers"), str(REPO)]
FACTORIES = ("Flat", "HNSW32,Flat", "IVF64,Flat")


def _answer(idx: Path, queries: np.ndarray, target: str, how: str) -> np.ndarray:
    """The ids of one search after opening `idx` the way `how` says ('quick', 'quick, no background', 'full')."""
    from index import store
    from index.search import Searcher

    mmap = "IVF" in store.read_info(idx)["factory"] and how != "full"
    full = {"quick": None, "quick, no background": False, "full": True}[how]
    opened = store.open_index(idx, mmap=mmap, full=full)
    try:
        return Searcher(opened).search_ids(queries, k=5, target=target)[1]
    finally:
        opened.close()


def flips(work: Path, n: int, seed: int) -> list[dict]:
    from reliability_helpers import flip_bit, unit_vectors, vector_index

    from index import store

    rows = []
    rng = np.random.default_rng(seed)
    queries = unit_vectors(8, 64, seed=9)
    for factory in FACTORIES:
        idx = vector_index(work / f"flip-{factory}", n=5000, d=64, factory=factory)
        gen = store.resolve(idx).gen_dir
        for name, target in ((store.IMAGES_FILE, "images"), (store.REPORTS_FILE, "reports")):
            truth = _answer(idx, queries, target, "full")
            pristine = (gen / name).read_bytes()
            counts = {"caught at open": 0, "caught before the first answer": 0, "changed answers served": 0,
                      "baseline: caught at open": 0, "baseline: changed answers served": 0}  # fmt: skip
            for _ in range(n):
                flip_bit(gen / name, rng)
                for how, prefix in (("quick", ""), ("quick, no background", "baseline: ")):
                    try:
                        ids = _answer(idx, queries, target, how)
                    except store.IndexError_ as e:
                        late = "after a quick open" in str(e)
                        counts[f"{prefix}caught {'before the first answer' if late else 'at open'}"] += 1
                        continue
                    counts[f"{prefix}changed answers served"] += int(not np.array_equal(ids, truth))
                (gen / name).write_bytes(pristine)
            rows.append({"factory": factory + (" (--mmap)" if "IVF" in factory else ""), "file": name,
                         "size_kb": round(len(pristine) / 1024, 1), "flips": n, **counts})  # fmt: skip
            print(rows[-1], flush=True)
    return rows


def cost(work: Path, n: int, dim: int, repeats: int) -> list[dict]:
    from reliability_helpers import unit_vectors, vector_index

    from index import store

    idx = vector_index(work / "cost", n=n, d=dim)
    gen = store.resolve(idx).gen_dir
    nbytes = sum((gen / f).stat().st_size for f in (store.IMAGES_FILE, store.REPORTS_FILE, store.META_FILE))
    q = unit_vectors(1, dim, seed=3)
    times: dict[str, list[float]] = {"full hash at open": [], "quick + background hash": [], "quick, no background": []}
    for _ in range(repeats):
        for how, key in (("full", "full hash at open"), ("quick", "quick + background hash"),
                         ("quick, no background", "quick, no background")):  # fmt: skip
            t0 = time.perf_counter()
            _answer(idx, q, "images", how)
            times[key].append(time.perf_counter() - t0)
    row = {"rows": n, "dim": dim, "MB": round(nbytes / 1e6, 1)}
    row |= {f"first answer, {k} ms": round(float(np.median(v)) * 1e3, 1) for k, v in times.items()}
    print(row, flush=True)
    return [row]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--flips", type=int, default=200)
    ap.add_argument("--cost-rows", type=int, default=100_000)
    ap.add_argument("--cost-dim", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--name", default="reliability_quick_open")
    args = ap.parse_args()
    import faiss

    from index import store

    faiss.omp_set_num_threads(1)
    store.FULL_HASH_AT_OPEN = 0  # every default open takes the quick path
    work = Path(tempfile.mkdtemp(prefix="cxr-quick-open-"))
    try:
        payload = {"flips": flips(work, args.flips, args.seed),
                   "cost": cost(work, args.cost_rows, args.cost_dim, args.repeats)}  # fmt: skip
    finally:
        shutil.rmtree(work, ignore_errors=True)
    md = ["## Single-bit flips against quick opens (file restored after each trial)", "",
          markdown_table(payload["flips"]), "", "## Time to the first answer (median)", "",
          markdown_table(payload["cost"])]  # fmt: skip
    cmd = "python -m benchmarks.quick_open " + " ".join(sys.argv[1:])
    json_path, md_path = write_results(args.name, payload, "\n".join(md), cmd.strip())
    print(md_path.read_text())
    print(json.dumps({"json": str(json_path), "md": str(md_path)}))


if __name__ == "__main__":
    main()
