"""Index build speed and memory, files to index: images/s and peak RSS at several corpus sizes.

    python -m benchmarks.index_build --sizes 10000 100000

Synthetic 256x256 greyscale JPEG files (made once under --workdir, outside the repo) with report texts cycled from
the IU X-ray reports. Each build runs `cxr index build` in its own process; a sampler sums the RSS of that process
and its DataLoader workers every 0.1 s. The naive way (decode every image into a list, encode one image at a time
with open_clip-style PIL preprocessing, then build) runs at the smallest size in the same run.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # inherited by the build processes: no OpenMP spin-waiting

import argparse
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pandas as pd
import psutil

from benchmarks.common import markdown_table, synthetic_radiographs, write_results


def make_manifest(paths: list[str], out: Path) -> Path:
    from retrieval.data.importers.iu_xray import read_iu_reports
    from retrieval.data.manifest import normalize_manifest, write_manifest

    reports = [r.get("report") or r.get("findings") or "" for r in read_iu_reports()]
    reports = [r for r in reports if r.strip()] or ["No acute cardiopulmonary abnormality."]
    n = len(paths)
    df = pd.DataFrame(
        {
            "image_id": [f"i{i}" for i in range(n)],
            "study_id": [f"s{i}" for i in range(n)],
            "patient_id": [f"p{i}" for i in range(n)],
            "image_path": paths,
            "report": [reports[i % len(reports)] for i in range(n)],
            "split": "train",
            "source": "synthetic",
        }
    )
    write_manifest(normalize_manifest(df), out)
    return out


def run_sampled(cmd: list[str]) -> tuple[float, float, str]:
    """Run cmd; return (seconds, peak RSS of the process tree in MiB, stdout)."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    peak = [0.0]

    def sample() -> None:
        try:
            root = psutil.Process(proc.pid)
            while proc.poll() is None:
                total = 0
                for p in [root, *root.children(recursive=True)]:
                    try:
                        total += p.memory_info().rss
                    except psutil.Error:
                        pass
                peak[0] = max(peak[0], total / 2**20)
                time.sleep(0.1)
        except psutil.Error:
            pass

    t = threading.Thread(target=sample, daemon=True)
    t.start()
    out, _ = proc.communicate()
    t.join()
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed with exit code {proc.returncode}")
    return time.perf_counter() - t0, peak[0], out


NAIVE = """
import sys, time, numpy as np, torch, faiss
from PIL import Image
from retrieval.data.manifest import read_manifest
from retrieval.models import load_model
model = load_model(sys.argv[2]); model.eval()
df = read_manifest(sys.argv[1])
t = model.image_transform()
imgs = [np.asarray(Image.open(p).convert("L"), dtype=np.float32) / 255 for p in df["image_path"]]  # all in memory
with torch.no_grad():
    vecs = [model.project_images(model.image_features(t(im).unsqueeze(0))).numpy() for im in imgs]  # one at a time
    rep = model.encode_texts(list(df["report"]))
x = np.concatenate(vecs).astype(np.float32)
for v in (x, rep):
    ix = faiss.IndexFlatIP(v.shape[1]); ix.add(np.ascontiguousarray(v))
print(len(x))
"""


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000])
    p.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "cxr-bench-build"))
    p.add_argument("--model", default="cxr-tiny", help="model name or folder (architecture is what matters)")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--naive", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--engines", nargs="+", default=["local"], choices=["local", "ray"], help="cxr index build --engine")
    p.add_argument("--name", default="index_build_cpu")
    a = p.parse_args()
    work = Path(a.workdir)
    model_dir = work / "model"
    from retrieval.errors import ModelLoadError
    from retrieval.models import load_model

    try:
        load_model(model_dir)
    except ModelLoadError:  # none yet, or saved by another version of the code
        shutil.rmtree(model_dir, ignore_errors=True)
        load_model(a.model).save(model_dir)
    files = synthetic_radiographs(work / "images", max(a.sizes))
    rows = []
    for n in sorted(a.sizes):
        manifest = make_manifest(files[:n], work / f"manifest_{n}.parquet")
        for engine in a.engines:
            out = work / f"index_{n}_{engine}"
            subprocess.run(["rm", "-rf", str(out)], check=True)
            cmd = [
                sys.executable, "-m", "cli.main", "index", "build", "--manifest", str(manifest), "--model",
                str(model_dir), "--out", str(out), "--workers", str(a.workers), "--batch-size", str(a.batch_size),
                "--engine", engine, "--json",
            ]  # fmt: skip
            secs, peak, _ = run_sampled(cmd)
            dim = read_info(out)["dim"]
            rows.append(
                {
                    "n": n,
                    "method": "cxr index build" + ("" if engine == "local" else f" --engine {engine}"),
                    "seconds": secs,
                    "images_per_s": n / secs,
                    "peak_rss_mib": peak,
                    "vectors_mib": 2 * n * 4 * dim / 2**20,
                    "load_1min": round(os.getloadavg()[0], 1),
                }
            )
            print(rows[-1], flush=True)
            report(rows, a.sizes, a.model, a.name)
        if len(a.engines) > 1:
            rows[-1].update(same_index(work / f"index_{n}_{a.engines[0]}", work / f"index_{n}_{a.engines[-1]}"))
            print(rows[-1], flush=True)
            report(rows, a.sizes, a.model, a.name)
        if a.naive and n == min(a.sizes):
            secs, peak, _ = run_sampled([sys.executable, "-c", NAIVE, str(manifest), str(model_dir)])
            rows.append(
                {
                    "n": n,
                    "method": "naive (all in memory, one image at a time)",
                    "seconds": secs,
                    "images_per_s": n / secs,
                    "peak_rss_mib": peak,
                    "vectors_mib": rows[-1]["vectors_mib"],
                    "load_1min": round(os.getloadavg()[0], 1),
                }
            )
            print(rows[-1], flush=True)
            report(rows, a.sizes, a.model, a.name)
    print(report(rows, a.sizes, a.model, a.name))


def read_info(out: Path) -> dict:
    from index.store import read_info as read

    return read(out)


def same_index(a: Path, b: Path) -> dict:
    """The identical-result check between two builds of the same manifest: ids, vectors, search results."""
    import numpy as np

    from index.search import Searcher
    from index.store import open_index

    x, y = open_index(a), open_index(b)
    same_ids = list(x.meta["image_id"]) == list(y.meta["image_id"])
    diff = max(
        float(np.abs(x.target(t).reconstruct_n(0, x.count) - y.target(t).reconstruct_n(0, y.count)).max())
        for t in ("images", "reports")
    )
    q = x.images.reconstruct_n(0, min(200, x.count))
    same_hits = all(
        np.array_equal(Searcher(a).search_ids(q, 10, t)[1], Searcher(b).search_ids(q, 10, t)[1])
        for t in ("images", "reports")
    )
    return {"same_ids": same_ids, "max_vector_diff": diff, "same_top10_200_queries": same_hits}


def report(rows: list[dict], sizes: list[int], model: str, name: str = "index_build_cpu") -> str:
    """Write results/<name>.{json,md} from the rows so far (called after every row); the markdown."""
    ours = [r for r in rows if r["method"] == "cxr index build"]
    for r in rows:
        if "--engine ray" in r["method"]:
            local = next((o for o in ours if o["n"] == r["n"]), None)
            if local:
                lines_ray = (
                    f"- Ray engine at {r['n']:,} images: {r['images_per_s'] / local['images_per_s']:.2f}x the default "
                    f"engine's images/s, {r['peak_rss_mib'] / local['peak_rss_mib']:.2f}x its peak RSS (load "
                    f"{r.get('load_1min')}); same ids {r.get('same_ids')}, max vector difference "
                    f"{r.get('max_vector_diff')}, same top 10 for 200 queries {r.get('same_top10_200_queries')}."
                )
                rows_ray = lines_ray
                break
    else:
        rows_ray = ""
    lines = []
    if len(ours) >= 2:
        lo, hi = ours[0], ours[-1]
        growth = (hi["peak_rss_mib"] - lo["peak_rss_mib"]) - (hi["vectors_mib"] - lo["vectors_mib"])
        lines.append(
            f"- Peak RSS {lo['peak_rss_mib']:.0f} MiB at {lo['n']:,} images, {hi['peak_rss_mib']:.0f} MiB at "
            f"{hi['n']:,}; growth beyond the vectors themselves: {growth:.0f} MiB."
        )
    naive = [r for r in rows if r["method"].startswith("naive")]
    if naive:
        lines.append(
            f"- At {ours[0]['n']:,} images the streaming build runs "
            f"{ours[0]['images_per_s'] / naive[0]['images_per_s']:.1f}x the naive images/s with "
            f"{ours[0]['peak_rss_mib'] / naive[0]['peak_rss_mib']:.2f}x its peak RSS."
        )
    if rows_ray:
        lines.append(rows_ray)
    md = "\n".join(lines) + "\n\n" + markdown_table(rows)
    cmd = "python -m benchmarks.index_build " + " ".join(sys.argv[1:])
    write_results(name, {"rows": rows, "model": model}, md, cmd)
    return md


if __name__ == "__main__":
    main()
