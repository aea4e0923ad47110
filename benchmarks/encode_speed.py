"""Image encoding speed (images/s): model-only and end-to-end from JPEG/PNG files, against the naive way.

    python -m benchmarks.encode_speed --models cxr-tiny biomedclip-arch

Model-only: pre-decoded, preprocessed tensors through the image tower and projector, fp32 and bf16 autocast, several
batch sizes. End-to-end: `CXRModel.encode_images(paths)` (decode + preprocess in DataLoader workers, batched encode).
The naive baseline runs in the same process: open_clip's own PIL preprocess (`open_clip.image_transform`), one image
at a time. BiomedCLIP's architecture runs with random weights (`biomedclip-arch`): the cost is the same.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads libgomp: no spin-waiting on busy machines

import argparse  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

from benchmarks.common import RESULTS, markdown_table, synthetic_radiographs, write_results  # noqa: E402
from retrieval.device import autocast, resolve_device  # noqa: E402


def images_per_s(fn, n_images: int, min_time: float, max_iters: int = 50) -> float:
    """Run fn (which processes n_images) until min_time has passed (after one warm-up); images per second."""
    fn()
    iters, t0 = 0, time.perf_counter()
    while True:
        fn()
        iters += 1
        elapsed = time.perf_counter() - t0
        if elapsed >= min_time or iters >= max_iters:
            return iters * n_images / elapsed


def model_only(model, device, batch: int, precision: str, min_time: float) -> float:
    x = torch.randn(batch, 3, model.image_size, model.image_size, device=device)

    def run() -> None:
        with torch.inference_mode(), autocast(device, precision):
            model.project_images(model.image_features(x))
        if device.type == "cuda":
            torch.cuda.synchronize()

    return images_per_s(run, batch, min_time)


def naive_files(model, paths: list[str], device) -> float:
    """open_clip's PIL preprocess (Resize, CenterCrop, ToTensor, Normalize), one image at a time."""
    import open_clip
    from PIL import Image

    t = model.image_transform()
    pre = open_clip.image_transform(model.image_size, is_train=False, mean=t.mean, std=t.std)
    t0 = time.perf_counter()
    with torch.inference_mode():
        for p in paths:
            x = pre(Image.open(p).convert("RGB")).unsqueeze(0).to(device)
            model.project_images(model.image_features(x)).cpu()
    return len(paths) / (time.perf_counter() - t0)


def ours_files(model, paths: list[str], device, batch: int, precision: str, workers: int) -> float:
    model.encode_images(paths[: 2 * batch], batch_size=batch, device=device, precision=precision)  # warm-up
    t0 = time.perf_counter()
    model.encode_images(paths, batch_size=batch, device=device, precision=precision, num_workers=workers)
    return len(paths) / (time.perf_counter() - t0)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=["cxr-tiny", "biomedclip-arch"])
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 16, 64])
    p.add_argument("--precisions", nargs="+", default=["fp32", "bf16"])
    p.add_argument("--files", type=int, default=128, help="files per format for the end-to-end runs")
    p.add_argument("--file-size", type=int, default=1024, help="pixels per side of the test files")
    p.add_argument("--formats", nargs="+", default=["jpg", "png"], help="file formats of the end-to-end runs")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--min-time", type=float, default=3.0)
    p.add_argument("--device", default=None)
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    p.add_argument("--naive-files", type=int, default=32, help="files per format for the naive one-at-a-time run")
    p.add_argument("--append", action="store_true", help="keep rows of other models already in the results file")
    p.add_argument("--name", default=None)
    a = p.parse_args(argv)
    argv = sys.argv[1:] if argv is None else argv
    if a.threads:
        torch.set_num_threads(a.threads)
    from retrieval.models import load_model

    device = resolve_device(a.device)
    work = Path(os.environ.get("CXR_BENCH_DIR", tempfile.gettempdir())) / "cxr-bench-encode"
    files = {fmt: synthetic_radiographs(work / fmt, a.files, a.file_size, fmt) for fmt in a.formats}
    rows = []
    for name in a.models:
        model = load_model(name).to(device).eval()
        for prec in a.precisions:
            for b in a.batch_sizes:
                ips = model_only(model, device, b, prec, a.min_time)
                rows.append(
                    {
                        "model": name,
                        "mode": "model-only",
                        "input": "tensor",
                        "precision": prec,
                        "batch": b,
                        "images_per_s": ips,
                    }
                )
                print(rows[-1], flush=True)
        for fmt, paths in files.items():
            n_naive = min(len(paths), a.naive_files)
            naive = naive_files(model, paths[:n_naive], device)
            rows.append(
                {
                    "model": name,
                    "mode": "naive: open_clip PIL preprocess, 1 at a time",
                    "input": fmt,
                    "precision": "fp32",
                    "batch": 1,
                    "images_per_s": naive,
                }
            )
            print(rows[-1], flush=True)
            for prec in a.precisions:
                b = max(a.batch_sizes)
                print(f"{name} {fmt} {prec}: encode_images over {len(paths)} files", flush=True)
                ips = ours_files(model, paths, device, b, prec, a.workers)
                rows.append(
                    {
                        "model": name,
                        "mode": f"encode_images ({a.workers} workers)",
                        "input": fmt,
                        "precision": prec,
                        "batch": b,
                        "images_per_s": ips,
                        "x_naive": ips / naive,
                    }
                )
                print(rows[-1], flush=True)
        del model
    tag = a.name or f"encode_speed_{device.type}"
    cmd = "python -m benchmarks.encode_speed " + " ".join(argv)
    old = RESULTS / f"{tag}.json"
    commands = [cmd]
    if a.append and old.exists():
        prev = json.loads(old.read_text())
        rows = [r for r in prev["rows"] if r["model"] not in a.models] + rows
        commands = prev.get("commands", [prev.get("command", "")]) + commands
    lines = []
    for name in dict.fromkeys(r["model"] for r in rows):
        mine = [r for r in rows if r["model"] == name]
        best = max((r for r in mine if r["mode"] == "model-only"), key=lambda r: r["images_per_s"], default=None)
        e2e = [r for r in mine if "x_naive" in r]
        if best and e2e:
            top = max(e2e, key=lambda r: r["x_naive"])
            lines.append(
                f"- {name}: model-only best {best['images_per_s']:.1f} img/s ({best['precision']}, batch "
                f"{best['batch']}); end-to-end best {top['images_per_s']:.1f} img/s from {top['input']} "
                f"({top['precision']}) = {top['x_naive']:.1f}x the naive one-at-a-time PIL way."
            )
    md = (
        "\n".join(lines)
        + "\n\n"
        + markdown_table(rows, ["model", "mode", "input", "precision", "batch", "images_per_s", "x_naive"])
    )
    payload = {
        "rows": rows,
        "file_size": a.file_size,
        "files": a.files,
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
        "commands": commands,
    }
    write_results(tag, payload, md, " ; ".join(commands))
    print(md)


if __name__ == "__main__":
    main()
