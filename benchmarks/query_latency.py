"""Query latency, file to answer: decode, preprocess, encode, search and metadata, p50/p99 per stage.

    python -m benchmarks.query_latency --models cxr-tiny biomedclip-arch --gallery 100000

The gallery is an index folder of random unit vectors (the model's dimension, the factory `index/` picks for its
size) with a meta row each, written through `index.generations.save_index`, so search and metadata cost what they would.
Ours: `index.search.Searcher.query_image` one file at a time, timed per stage. The naive way in the same run:
open_clip's PIL preprocess, the model, numpy brute force over all vectors, and a pandas row lookup.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch/faiss load libgomp: no spin-waiting

import argparse  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import torch  # noqa: E402

from benchmarks.common import (  # noqa: E402
    RESULTS,
    markdown_table,
    random_index,
    synthetic_radiographs,
    write_results,
)


def percentiles(xs: list[float]) -> tuple[float, float]:
    a = np.asarray(xs) * 1e3
    return float(np.percentile(a, 50)), float(np.percentile(a, 99))


def ours(searcher, model, paths: list[str]) -> dict[str, list[float]]:
    from retrieval.data.image_io import read_image

    t = model.image_transform()
    stages: dict[str, list[float]] = {k: [] for k in ("decode", "preprocess", "encode", "search+meta", "total")}
    for p in paths:
        t0 = time.perf_counter()
        img = read_image(p)
        t1 = time.perf_counter()
        x = t(img).unsqueeze(0)
        t2 = time.perf_counter()
        with torch.inference_mode():
            v = model.project_images(model.image_features(x)).float().numpy()
        t3 = time.perf_counter()
        searcher.query_vector(v, k=5, target="images")
        t4 = time.perf_counter()
        for k, d in zip(stages, (t1 - t0, t2 - t1, t3 - t2, t4 - t3, t4 - t0), strict=True):
            stages[k].append(d)
    return stages


def naive(model, vecs: np.ndarray, meta: pd.DataFrame, paths: list[str]) -> list[float]:
    import open_clip
    from PIL import Image

    t = model.image_transform()
    pre = open_clip.image_transform(model.image_size, is_train=False, mean=t.mean, std=t.std)
    out = []
    for p in paths:
        t0 = time.perf_counter()
        x = pre(Image.open(p).convert("RGB")).unsqueeze(0)
        with torch.inference_mode():
            v = model.project_images(model.image_features(x)).numpy()
        top = np.argsort(-(vecs @ v[0]))[:5]
        meta.iloc[top].to_dict(orient="records")
        out.append(time.perf_counter() - t0)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=["cxr-tiny", "biomedclip-arch"])
    p.add_argument("--gallery", type=int, default=100_000)
    p.add_argument("--queries", type=int, default=50)
    p.add_argument("--file-size", type=int, default=1024)
    p.add_argument("--append", action="store_true", help="keep rows of other models already in the results file")
    a = p.parse_args()
    from index.search import Searcher
    from index.store import open_index
    from retrieval.models import load_model

    work = Path(os.environ.get("CXR_BENCH_DIR", tempfile.gettempdir())) / "cxr-bench-query"
    paths = synthetic_radiographs(work / "files", a.queries, a.file_size, "jpg")
    rows = []
    for name in a.models:
        model = load_model(name).eval()
        folder = random_index(work / f"index_{name}_{a.gallery}_{model.fingerprint[:12]}", model, a.gallery)
        searcher = Searcher(folder, model)
        idx = open_index(folder, model)
        vecs = idx.images.reconstruct_n(0, idx.count) if hasattr(idx.images, "reconstruct_n") else None
        ours(searcher, model, paths[:3])  # warm-up
        stages = ours(searcher, model, paths)
        row = {"model": name, "gallery": a.gallery, "factory": idx.info["factory"], "method": "Searcher"}
        for k, v in stages.items():
            row[f"{k}_p50_ms"], row[f"{k}_p99_ms"] = percentiles(v)
        rows.append(row)
        print(row, flush=True)
        if vecs is not None:
            t = naive(model, vecs, idx.meta, paths)
            p50, p99 = percentiles(t)
            rows.append(
                {
                    "model": name,
                    "gallery": a.gallery,
                    "factory": "numpy brute force",
                    "method": "naive (PIL preprocess + numpy)",
                    "total_p50_ms": p50,
                    "total_p99_ms": p99,
                }
            )
            print(rows[-1], flush=True)
    cols = [
        "model",
        "gallery",
        "method",
        "factory",
        "decode_p50_ms",
        "preprocess_p50_ms",
        "encode_p50_ms",
        "search+meta_p50_ms",
        "total_p50_ms",
        "total_p99_ms",
    ]
    cmd = "python -m benchmarks.query_latency " + " ".join(sys.argv[1:])
    commands = [cmd]
    old = RESULTS / "query_latency_cpu.json"
    if a.append and old.exists():
        prev = json.loads(old.read_text())
        rows = [r for r in prev["rows"] if r["model"] not in a.models] + rows
        commands = prev.get("commands", [prev.get("command", "")]) + commands
    md = markdown_table(rows, cols)
    write_results("query_latency_cpu", {"rows": rows, "commands": commands}, md, " ; ".join(commands))
    print(md)


if __name__ == "__main__":
    main()
