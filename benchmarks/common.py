"""Shared by the benchmarks: machine info, timing helpers, and writing results as JSON + markdown."""

from __future__ import annotations

import json
import os
import platform
import resource
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

# CXR_BENCH_RESULTS: another folder for the results (the GPU check's dry run writes there, not over the tables)
RESULTS = Path(os.environ.get("CXR_BENCH_RESULTS") or Path(__file__).resolve().parent / "results")


def machine_info() -> dict:
    """CPU, core count, memory, GPU and library versions, recorded beside every result."""
    import faiss
    import torch

    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
        "load_avg_1min": round(os.getloadavg()[0], 1),
        "memory_gib": round(mem_gib, 1),
        "gpu": gpu,
        **(gpu_info() if gpu else {}),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "faiss": faiss.__version__,
        "numpy": np.__version__,
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        **({"note": os.environ["CXR_GPU_CHECK_NOTE"]} if os.environ.get("CXR_GPU_CHECK_NOTE") else {}),
    }


def gpu_info() -> dict:
    """The GPU's driver and CUDA versions (torch's build and, from nvidia-smi, the driver's) and memory."""
    import subprocess

    import torch

    props = torch.cuda.get_device_properties(0)
    info = {"gpu_memory_gib": round(props.total_memory / 2**30, 1), "cuda_torch": torch.version.cuda}
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True, text=True, timeout=20, check=True,
        ).stdout  # fmt: skip
        info["gpu_driver"] = out.strip().splitlines()[0]
        head = subprocess.run(["nvidia-smi"], capture_output=True, text=True, timeout=20).stdout
        found = [w for w in head.split("|") if "CUDA Version" in w]
        info["cuda_driver"] = found[0].split("CUDA Version:")[1].strip() if found else None
    except (OSError, subprocess.SubprocessError, IndexError):
        info["gpu_driver"] = None
    return info


def peak_rss_mib() -> float:
    """Peak resident set size of this process so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def current_rss_mib() -> float:
    import psutil

    return psutil.Process().memory_info().rss / 2**20


def time_calls(fn: Callable[[], object], repeat: int, warmup: int = 1) -> np.ndarray:
    """Wall time in seconds of each of `repeat` calls of fn, after `warmup` untimed calls."""
    for _ in range(warmup):
        fn()
    out = np.empty(repeat)
    for i in range(repeat):
        t0 = time.perf_counter()
        fn()
        out[i] = time.perf_counter() - t0
    return out


def markdown_table(rows: Sequence[dict], columns: Sequence[str] | None = None) -> str:
    """A GitHub markdown table of dict rows; floats get 4 significant digits."""
    if not rows:
        return "(no rows)\n"
    columns = list(columns or rows[0].keys())

    def fmt(v: object) -> str:
        if isinstance(v, float):
            return f"{v:.4g}"
        return "" if v is None else str(v)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(fmt(r.get(c)) for c in columns) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def write_results(name: str, payload: dict, markdown: str, command: str) -> tuple[Path, Path]:
    """Write results/<name>.json and results/<name>.md (with the command and machine info)."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    info = payload.setdefault("machine", machine_info())
    payload["command"] = command
    json_path = RESULTS / f"{name}.json"
    json_path.write_text(json.dumps(payload, indent=2, default=str) + "\n")
    machine = "Machine: " + ", ".join(f"{k}={v}" for k, v in info.items())
    md = [f"# {name}", "", f"Command: `{command}`", "", machine, ""]
    md_path = RESULTS / f"{name}.md"
    md_path.write_text("\n".join(md) + "\n" + markdown)
    return json_path, md_path


def synthetic_radiographs(folder: Path, n: int, size: int = 256, fmt: str = "jpg") -> list[str]:
    """n distinct greyscale files (smooth gradients + noise, so they compress like radiographs); made once, reused."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    paths = []
    for i in range(n):
        p = folder / f"img{i:07d}.{fmt}"
        paths.append(str(p))
        a, b, c = rng.uniform(0.2, 0.8, 3)
        noise = rng.standard_normal((size, size))
        if p.exists():
            continue
        img = 255 * np.clip(a * xx + b * yy * (1 - yy) * 2 + c * 0.3 + 0.05 * noise, 0, 1)
        Image.fromarray(img.astype(np.uint8)).save(p, **({"quality": 90} if fmt == "jpg" else {}))
    return paths


def random_index(folder: Path, model, n: int, model_dir: Path | None = None) -> Path:
    """An index folder for `model` (recorded with `model_dir` when given) holding n seeded random unit vectors and
    plausible meta rows, written through `index.generations.save_index` so search and metadata cost what they would;
    an index already there is reused."""
    import pandas as pd

    from index.factory import build_from_vectors
    from index.generations import save_index
    from index.layout import versions
    from index.store import has_index, model_record

    if has_index(folder):
        return folder
    rng = np.random.default_rng(0)
    vecs = rng.standard_normal((n, model.embed_dim), dtype=np.float32)
    vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
    images, factory = build_from_vectors(vecs)
    reports, _ = build_from_vectors(vecs[::-1].copy(), factory)
    meta = pd.DataFrame(
        {
            "row_id": np.arange(n),
            "image_id": [f"i{i}" for i in range(n)],
            "study_id": [f"s{i}" for i in range(n)],
            "patient_id": [f"p{i}" for i in range(n)],
            "image_path": [f"/data/i{i}.jpg" for i in range(n)],
            "view": "PA",
            "report": ["Heart size is normal. The lungs are clear. No pleural effusion or pneumothorax."] * n,
            "labels": [["No Finding"]] * n,
            "split": "train",
            "source": "synthetic",
            "has_report": True,
        }
    )
    info = {"factory": factory, "normalized": True, "model": model_record(model, model_dir), "versions": versions()}
    save_index(folder, images, reports, meta, info)
    return folder
