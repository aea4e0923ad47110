"""Image search latency through `cxr serve` (HTTP on loopback) against one `cxr query` process per query, same run.

    python -m benchmarks.serve_latency --model cxr-tiny --gallery 20000 --queries 200 --cli-calls 5
    python -m benchmarks.serve_latency --index ~/.cache/cxr-retrieval/demo/index    # an existing index

Without `--index`, the gallery is an index folder of random unit vectors (the model's dimension, the factory
`index/` picks for its size) with a meta row each, recording the saved model's folder so that both `cxr serve`
and `cxr query` load it by themselves. Queries are 1024 px synthetic JPEGs, uploaded one at a time by one
keep-alive client (multipart, k=5, target reports, as `cxr query`'s defaults). Rows:

- `cxr serve` over HTTP: wall time per request at the client (upload, decode, preprocess, encode, search, JSON);
- `Searcher.query_image` in this process: the library call the server makes, without HTTP (the floor);
- `cxr query FILE --json` as a new process per query: what a user paid before (imports, model load, search).
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch/faiss load libgomp: no spin-waiting

import argparse  # noqa: E402
import json  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

from benchmarks.common import markdown_table, random_index, synthetic_radiographs, write_results  # noqa: E402
from benchmarks.serve_common import REPO, load_avg, start_server, stop_server  # noqa: E402

WORK = Path(os.environ.get("CXR_BENCH_DIR", tempfile.gettempdir())) / "cxr-bench-serve"


def saved_model(name: str) -> Path:
    """`name` loaded once and saved as a folder (so the index can record it); a folder is used as it is."""
    from retrieval.models import load_model

    if Path(name).is_dir():
        return Path(name)
    folder = WORK / f"model_{name}"
    if not (folder / "model_info.json").exists():
        load_model(name, device="cpu").save(folder)
    return folder


def random_index_for(folder: Path, model_dir: Path, n: int) -> Path:
    """`common.random_index` for the model saved in `model_dir` (recording that folder), named by its fingerprint."""
    from retrieval.models import load_model

    model = load_model(model_dir, device="cpu")
    return random_index(folder.with_name(f"{folder.name}_{model.fingerprint[:12]}"), model, n, model_dir)


def pct(xs: list[float]) -> dict:
    a = np.asarray(xs) * 1e3
    return {
        "n": len(a),
        "p50_ms": float(np.percentile(a, 50)),
        "p99_ms": float(np.percentile(a, 99)),
        "mean_ms": float(a.mean()),
    }


def http_latency(url: str, files: list[str], n: int, warmup: int = 5) -> tuple[list[float], dict]:
    """Wall time of n sequential image uploads to /search (one keep-alive client); also the first answer."""
    import httpx

    data = [Path(f).read_bytes() for f in files]
    out, first = [], None
    with httpx.Client(timeout=120) as c:
        for i in range(warmup + n):
            body = data[i % len(data)]
            t0 = time.perf_counter()
            r = c.post(url + "/search", files={"image": (Path(files[i % len(files)]).name, body, "image/jpeg")})
            dt = time.perf_counter() - t0
            r.raise_for_status()
            if i % len(data) == 0 and first is None:
                first = r.json()
            if i >= warmup:
                out.append(dt)
    return out, first


def library_latency(index: Path, model_dir: Path, files: list[str], n: int) -> list[float]:
    from index.search import Searcher
    from retrieval.models import load_model

    s = Searcher(index, load_model(model_dir).eval())
    for f in files[:3]:
        s.query_image(f, k=5)
    out = []
    for i in range(n):
        t0 = time.perf_counter()
        s.query_image(files[i % len(files)], k=5)
        out.append(time.perf_counter() - t0)
    return out


def cli_latency(index: Path, files: list[str], n: int) -> tuple[list[float], dict]:
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    out, first = [], None
    for i in range(n):
        cmd = [sys.executable, "-m", "cli.main", "query", files[i % len(files)], "--index", str(index), "--json"]
        t0 = time.perf_counter()
        done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, check=True)
        out.append(time.perf_counter() - t0)
        if i == 0:
            first = json.loads(done.stdout)
    return out, first


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="cxr-tiny", help="model name or folder (ignored with --index)")
    p.add_argument("--index", type=Path, help="an existing index folder (its recorded model is used)")
    p.add_argument("--gallery", type=int, default=20_000)
    p.add_argument("--queries", type=int, default=200, help="HTTP and library queries")
    p.add_argument("--cli-calls", type=int, default=5, help="`cxr query` processes (each takes seconds)")
    p.add_argument("--files", type=int, default=20)
    p.add_argument("--file-size", type=int, default=1024)
    p.add_argument("--name", default="serve_latency_cpu")
    a = p.parse_args()

    from index.store import read_info

    if a.index:
        index = a.index
        model_dir = Path(read_info(index)["model"]["path"])
    else:
        model_dir = saved_model(a.model)
        index = random_index_for(WORK / f"index_{Path(a.model).name}_{a.gallery}", model_dir, a.gallery)
    info = read_info(index)
    files = synthetic_radiographs(WORK / "files", a.files, a.file_size, "jpg")
    label = {"model": info["model"]["name"], "rows": info["count"], "factory": info["factory"]}
    rows = []

    proc, url = start_server(["--index", str(index), "--no-vlm", "--watch-interval", "0"], WORK / "serve.log")
    try:
        la = load_avg()
        t, http_first = http_latency(url, files, a.queries)
        rows.append({**label, "method": "cxr serve, HTTP upload (1 client)", **pct(t), "load_avg": la})
        print(rows[-1], flush=True)
    finally:
        stop_server(proc)
    la = load_avg()
    t = library_latency(index, model_dir, files, a.queries)
    rows.append({**label, "method": "Searcher.query_image in-process (no HTTP)", **pct(t), "load_avg": la})
    print(rows[-1], flush=True)
    la = load_avg()
    t, cli_first = cli_latency(index, files, a.cli_calls)
    rows.append({**label, "method": "cxr query, one process per query", **pct(t), "load_avg": la})
    print(rows[-1], flush=True)

    same = [r["row_id"] for r in http_first["results"]] == [r["row_id"] for r in cli_first["results"]]
    cli_p50 = rows[-1]["p50_ms"]
    for r in rows:
        r["speedup_vs_cli_p50"] = round(cli_p50 / r["p50_ms"], 1)
    cols = ["model", "rows", "factory", "method", "n", "p50_ms", "p99_ms", "mean_ms", "speedup_vs_cli_p50", "load_avg"]
    md = markdown_table(rows, cols)
    md += (
        f"\nSame answer: the first query's top-5 row ids from HTTP and from `cxr query --json` are "
        f"{'identical' if same else 'DIFFERENT'}.\n"
        "\nload_avg: the 1-minute load average when the row started (2 cores; other sessions share them).\n"
    )
    cmd = "python -m benchmarks.serve_latency " + " ".join(sys.argv[1:])
    write_results(a.name, {"rows": rows, "same_answer": same}, md, cmd)
    print(md)


if __name__ == "__main__":
    main()
