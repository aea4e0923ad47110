"""CPU runtime of cxr-small's EfficientNet-Lite0 image tower: eager PyTorch (NCHW), channels_last, and ONNX Runtime,
model-only at several input sizes in the same run, plus the end-to-end image path (`encode_images` from files).

Run:  .venv/bin/python -m benchmarks.cnn_runtime [--sizes 160 192 224] [--seconds 4]
Writes benchmarks/results/cnn_runtime_cpu.{json,md}.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks.common import machine_info, markdown_table, synthetic_radiographs, write_results


def _rate(fn, batch: int, seconds: float) -> float:
    fn()  # warm-up
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        fn()
        n += batch
    return n / (time.perf_counter() - t0)


def model_only(sizes: list[int], batch: int, seconds: float) -> list[dict]:
    from retrieval.models import load_model, onnx_tower

    model = load_model("cxr-small", device="cpu")
    tower = model.clip.visual
    rows = []
    for size in sizes:
        x = torch.randn(batch, 3, size, size)
        with torch.no_grad():
            ref = tower(x)
            tower.to(memory_format=torch.contiguous_format)
            nchw = _rate(lambda: tower(x), batch, seconds)
            tower.to(memory_format=torch.channels_last)
            xc = x.contiguous(memory_format=torch.channels_last)
            cl = _rate(lambda: tower(xc), batch, seconds)
            t0 = time.perf_counter()
            out = onnx_tower.run(tower, x, "features")  # exports once (timed), then reuses the graph
            export_s = time.perf_counter() - t0
            ort = _rate(lambda: onnx_tower.run(tower, x, "features"), batch, seconds)
        rows.append(
            {
                "size": size,
                "batch": batch,
                "eager NCHW img/s": round(nchw, 1),
                "channels_last img/s": round(cl, 1),
                "ONNX Runtime img/s": round(ort, 1),
                "ORT / NCHW": round(ort / nchw, 2),
                "ORT / channels_last": round(ort / cl, 2),
                "max abs(ORT - torch)": float((out - ref).abs().max()),
                "first call (export) s": round(export_s, 1),
                "load_avg_1min": round(os.getloadavg()[0], 1),
            }
        )
        print(rows[-1], flush=True)
    return rows


def end_to_end(n: int, size: int, seconds_hint: float) -> list[dict]:
    """encode_images over n synthetic 1024-px JPEGs: ONNX Runtime vs PyTorch (CXR_IMAGE_RUNTIME=torch)."""
    from retrieval.models import load_model

    paths = synthetic_radiographs(Path("/tmp/cxr-bench-files/jpg1024"), n, size=1024, fmt="jpg")
    model = load_model("cxr-small", device="cpu")
    model.clip.visual.image_size = (size, size)
    rows = []
    for runtime in ("torch", "auto"):
        os.environ["CXR_IMAGE_RUNTIME"] = runtime
        model.encode_images(paths[:32], batch_size=32, num_workers=1)  # warm-up (and the export)
        t0 = time.perf_counter()
        model.encode_images(paths, batch_size=32, num_workers=1)
        dt = time.perf_counter() - t0
        rows.append(
            {
                "runtime": "PyTorch channels_last" if runtime == "torch" else "ONNX Runtime",
                "size": size,
                "images": n,
                "img/s": round(n / dt, 1),
                "load_avg_1min": round(os.getloadavg()[0], 1),
            }
        )
        print(rows[-1], flush=True)
    os.environ.pop("CXR_IMAGE_RUNTIME", None)
    return rows


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[160, 192, 224])
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--seconds", type=float, default=4.0)
    ap.add_argument("--files", type=int, default=256)
    ap.add_argument("--e2e-size", type=int, default=192)
    a = ap.parse_args(argv)
    torch.set_num_threads(min(2, os.cpu_count() or 2))
    rows = model_only(a.sizes, a.batch, a.seconds)
    e2e = end_to_end(a.files, a.e2e_size, a.seconds)
    result = {"model_only": rows, "end_to_end": e2e, "machine": machine_info()}
    md = [
        "Model-only: the image tower on random (B, 3, S, S) input, same process, sizes and runtimes interleaved.",
        "",
        markdown_table(rows),
        f"End-to-end: `encode_images` over {a.files} synthetic 1024-px JPEG files (decode + preprocess in one "
        "DataLoader worker, batch 32).",
        "",
        markdown_table(e2e),
        f"Speed-up of ONNX Runtime end to end: {e2e[1]['img/s'] / e2e[0]['img/s']:.2f}x. "
        f"Mean ORT / channels_last model-only: {np.mean([r['ORT / channels_last'] for r in rows]):.2f}x.",
        "",
    ]
    cmd = ".venv/bin/python -m benchmarks.cnn_runtime " + " ".join(argv or [])
    write_results("cnn_runtime_cpu", result, "\n".join(md), cmd.strip())


if __name__ == "__main__":
    main()
