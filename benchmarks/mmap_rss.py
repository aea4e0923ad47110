"""Memory of a query process with and without `--mmap`: resident heap and mapped file pages against file size.

    python -m benchmarks.mmap_rss --n 300000 --dim 512

Builds one re-ranked IVF index (the default rule's type at this size, `IVF{n},PQ{d/2}x4fs,RFlat`) over synthetic
vectors as an index folder (images and reports the same vectors), then starts a fresh Python process per mode
that opens it through `Searcher` and runs single queries, reporting from /proc/self/status:

    RssAnon   heap: what must fit in RAM (for mmap: the fast-scan codes, meta, the coarse quantizer)
    RssFile   file pages mapped into the process: the OS reads them on demand and may evict them (page cache)

`plain` reads the whole file onto the heap. The naive baseline is `plain`.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import json  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

from benchmarks.common import markdown_table, write_results  # noqa: E402

CHILD = r"""
import json, os, sys, time
import numpy as np

def status():
    out = {}
    for line in open("/proc/self/status"):
        key, _, value = line.partition(":")
        if key in ("VmRSS", "RssAnon", "RssFile"):
            out[key] = int(value.split()[0]) / 1024
    return out

import faiss, torch  # the libraries' own pages are not the index's
from index.search import Searcher
before = status()
t0 = time.perf_counter()
s = Searcher(sys.argv[1], mmap=sys.argv[2] == "mmap")
s.backend("images")
opened = status()
open_s = time.perf_counter() - t0
q = np.load(sys.argv[3])
lat = []
for row in q:
    t = time.perf_counter()
    s.search_ids(row[None], k=10, target="images")
    lat.append(time.perf_counter() - t)
after = status()
print(json.dumps({"before": before, "opened": opened, "after": after, "open_s": open_s,
                  "p50_ms": float(np.median(lat) * 1e3), "params": s.search_params["images"]}))
"""


def build(folder: Path, n: int, dim: int, log) -> Path:
    """An index folder over n synthetic vectors with the default rule's factory, tuned as a build tunes."""
    import pandas as pd

    from benchmarks.search_speed import SPECTRUM_ALPHA, embedding_like_vectors
    from index import generations, store, tune
    from index.factory import build_from_vectors, choose_factory

    if store.has_index(folder):
        return folder
    x = embedding_like_vectors(n, dim, SPECTRUM_ALPHA, seed=0)
    factory = choose_factory(n, dim)
    t0 = time.perf_counter()
    index, _ = build_from_vectors(x, factory)
    rec = tune.tune_on_vectors(index, x).record()
    log(f"{factory} built and tuned in {time.perf_counter() - t0:.0f} s: {rec['params']} recall {rec['recall']:.3f}")
    meta = pd.DataFrame(
        {
            "row_id": np.arange(n),
            "image_id": [f"i{i}" for i in range(n)],
            "study_id": [f"s{i}" for i in range(n)],
            "patient_id": [f"p{i}" for i in range(n)],
            "image_path": "",
            "view": "PA",
            "report": "",
            "labels": [[] for _ in range(n)],
            "split": "train",
            "source": "synthetic",
            "has_report": False,
        }
    )
    info = {
        "factory": factory,
        "model": {"name": "none", "fingerprint": "none"},
        "search": {"images": rec, "reports": rec},
    }
    generations.save_index(folder, index, index, meta, info)
    return folder


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=300_000)
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--queries", type=int, default=500)
    p.add_argument("--work", default=os.environ.get("CXR_HOME", "/tmp") + "/mmap_rss")
    p.add_argument("--name", default="mmap_rss_cpu")
    a = p.parse_args()
    from benchmarks.search_speed import SPECTRUM_ALPHA, embedding_like_vectors
    from index import store

    t_start = time.perf_counter()

    def log(x: object) -> None:
        print(f"[{time.perf_counter() - t_start:7.1f} s] {x}", flush=True)

    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    folder = build(work / f"idx-{a.n}-{a.dim}", a.n, a.dim, log)
    qfile = work / "queries.npy"
    np.save(qfile, embedding_like_vectors(a.queries, a.dim, SPECTRUM_ALPHA, seed=1))
    gen = store.resolve(folder).gen_dir
    file_mib = (gen / store.IMAGES_FILE).stat().st_size / 2**20
    both_mib = file_mib + (gen / store.REPORTS_FILE).stat().st_size / 2**20
    rows = []
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    for mode in ("plain", "mmap"):
        out = subprocess.run(
            [sys.executable, "-c", CHILD, str(folder), mode, str(qfile)], capture_output=True, text=True, env=env
        )
        if out.returncode:
            raise SystemExit(out.stderr[-2000:])
        r = json.loads(out.stdout.strip().splitlines()[-1])
        row = {
            "mode": mode,
            "factory": store.read_info(folder)["factory"],
            "params": " ".join(f"{k}={v}" for k, v in r["params"].items()),
            "images_file_mib": file_mib,
            "both_files_mib": both_mib,
            "heap_after_open_mib": r["opened"]["RssAnon"] - r["before"]["RssAnon"],
            "mapped_after_open_mib": r["opened"]["RssFile"] - r["before"]["RssFile"],
            "heap_after_queries_mib": r["after"]["RssAnon"] - r["before"]["RssAnon"],
            "mapped_after_queries_mib": r["after"]["RssFile"] - r["before"]["RssFile"],
            "rss_total_mib": r["after"]["VmRSS"],
            "open_s": r["open_s"],
            "p50_ms": r["p50_ms"],
            "queries": a.queries,
            "load_1min": round(os.getloadavg()[0], 1),
        }
        rows.append(row)
        log(row)
    plain, mm = rows
    md = (
        f"- {a.n:,} x {a.dim} vectors, {plain['factory']}: images.faiss {file_mib:.0f} MiB "
        f"(reports.faiss the same; both open). Plain open puts {plain['heap_after_queries_mib']:.0f} MiB on the "
        f"heap; --mmap {mm['heap_after_queries_mib']:.0f} MiB of heap plus {mm['mapped_after_queries_mib']:.0f} MiB "
        f"of mapped file pages after {a.queries} single queries (page cache the OS reads on demand and may evict; "
        f"readahead maps far more than the queries touch). "
        f"p50 {plain['p50_ms']:.2f} ms plain vs {mm['p50_ms']:.2f} ms mapped (warm cache).\n\n"
    )
    cmd = " ".join(["python -m benchmarks.mmap_rss"] + sys.argv[1:])
    write_results(a.name, {"n": a.n, "dim": a.dim, "rows": rows}, md + markdown_table(rows), cmd)
    print(md + markdown_table(rows))


if __name__ == "__main__":
    main()
