"""A model's whole image embedding (tower + projector + L2 norm) as one ONNX graph, keyed by the model's fingerprint,
so that a process holding only the fingerprint (an index's `index_info.json`) embeds an image on the CPU without
importing torch or open_clip: what makes `cxr query IMAGE` answer in about a second (issue 25).

- `export_embedder(model)` (needs torch): writes `embed-<fingerprint>.onnx`, a `.json` beside it (the model's
  fingerprint and preprocessing: size, mean, std, interpolation) and the graph's `.sha256` (`onnx_cache`, the folder
  `onnx_tower` uses too), atomically, once per model.
- `open_embedder(fingerprint)` (no torch): an `ImageEmbedder`, or None where nothing was exported for this
  fingerprint, the graph fails its checksum, ONNX Runtime is missing or `CXR_IMAGE_RUNTIME=torch`.
  Its `encode(HxW array)` preprocesses as `GreyImageTransform` does (longest side resized with PIL's antialiased
  float resampling, within 2e-5 of torch's; symmetric black padding; grey x3; mean/std) and runs one cached
  `InferenceSession`. Its vectors equal the torch path's within 1e-4 (tests/test_onnx_embedder.py).
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)
_SESSIONS: dict[str, Any] = {}
RESAMPLING = {"bilinear": 2, "bicubic": 3}  # PIL.Image.Resampling.BILINEAR / BICUBIC


def _paths(fingerprint: str) -> tuple[Path, Path]:
    from retrieval.models.onnx_cache import cache_dir

    stem = cache_dir() / f"embed-{fingerprint[:32]}"
    return stem.with_suffix(".onnx"), stem.with_suffix(".json")


def runtime_enabled() -> bool:
    if os.environ.get("CXR_IMAGE_RUNTIME", "auto").lower() == "torch":
        return False
    import importlib.util

    return importlib.util.find_spec("onnxruntime") is not None


def cpu_only(device: str | None) -> bool:
    """True when `device` means the CPU, read without importing torch: "cpu", or None / "auto" where no NVIDIA GPU
    is visible (no /proc/driver/nvidia/gpus entry, or CUDA_VISIBLE_DEVICES set empty or to -1)."""
    if device is not None and str(device) not in ("auto", "cpu"):
        return False
    if str(device) == "cpu":
        return True
    if os.environ.get("CUDA_VISIBLE_DEVICES", None) in ("", "-1"):
        return True
    gpus = Path("/proc/driver/nvidia/gpus")
    return not (gpus.is_dir() and any(gpus.iterdir()))


class ImageEmbedder:
    """HxW float [0, 1] grey image -> (1, D) float32 L2-normalised embedding, through ONNX Runtime only."""

    def __init__(self, graph: Path, meta: dict):
        self.graph, self.meta = graph, meta
        self.size = int(meta["size"])
        self.mean = np.asarray(meta["mean"], dtype=np.float32)[:, None, None]
        self.std = np.asarray(meta["std"], dtype=np.float32)[:, None, None]
        self.resample = RESAMPLING[meta["interpolation"]]

    def preprocess(self, image: np.ndarray) -> np.ndarray:
        """(3, S, S) float32, as `GreyImageTransform` makes it."""
        from PIL import Image

        from retrieval.models.preprocess import letterbox

        a, nh, nw, top, left = letterbox(image, self.size)
        if (nh, nw) != a.shape:
            a = np.asarray(Image.fromarray(np.ascontiguousarray(a), mode="F").resize((nw, nh), self.resample))
        out = np.zeros((self.size, self.size), dtype=np.float32)
        out[top : top + nh, left : left + nw] = np.clip(a, 0.0, 1.0)
        return (np.broadcast_to(out, (3, self.size, self.size)) - self.mean) / self.std

    def session(self) -> Any:
        key = str(self.graph)
        if key not in _SESSIONS:
            import onnxruntime as ort

            opts = ort.SessionOptions()
            opts.intra_op_num_threads = max(1, min(4, os.cpu_count() or 1))
            opts.log_severity_level = 3
            _SESSIONS[key] = ort.InferenceSession(key, opts, providers=["CPUExecutionProvider"])
        return _SESSIONS[key]

    def encode(self, image: np.ndarray) -> np.ndarray:
        x = np.ascontiguousarray(self.preprocess(image)[None], dtype=np.float32)
        out = np.asarray(self.session().run(None, {"pixels": x})[0], dtype=np.float32)
        return np.ascontiguousarray(out / np.linalg.norm(out, axis=1, keepdims=True))


def open_embedder(fingerprint: str | None) -> ImageEmbedder | None:
    """The exported embedder of the model with this fingerprint, or None (see the module docstring)."""
    if not fingerprint or not runtime_enabled():
        return None
    graph, meta_path = _paths(str(fingerprint))
    if not graph.is_file() or not meta_path.is_file():
        return None
    from retrieval.models.onnx_cache import export_problem

    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
        problem = export_problem(graph) or (None if meta.get("fingerprint") == fingerprint else "another model's")
        if problem:
            log.warning("%s: %s; the model runs in PyTorch (and exports it again)", graph, problem)
            return None
        return ImageEmbedder(graph, meta)
    except (OSError, ValueError, KeyError) as e:
        log.warning("%s: unreadable (%s); the model runs in PyTorch", meta_path, e)
        return None


def export_embedder(model: Any, fingerprint: str | None = None) -> Path | None:
    """Export `model`'s image embedding for `open_embedder` (once per fingerprint; pass `fingerprint` when it is
    known, to skip hashing the weights); the graph's path, or None where its preprocessing has no PIL equivalent
    or the exporter fails (said in the log; queries then stay in PyTorch)."""
    transform = model.image_transform()
    if getattr(transform, "interpolation", None) not in RESAMPLING or not runtime_enabled():
        return None
    fingerprint = fingerprint or model.fingerprint
    graph, meta_path = _paths(fingerprint)
    if open_embedder(fingerprint) is not None:  # exported and intact (a damaged one is written again)
        return graph
    try:
        _export(model, transform.size, graph)
    except Exception as e:  # an architecture the exporter cannot do: the torch path stays
        log.warning("could not export the image embedding to ONNX (%s: %s)", type(e).__name__, e)
        return None
    from retrieval.fileio import write_json_atomic
    from retrieval.models.onnx_cache import write_checksum

    meta = {"fingerprint": fingerprint, "model": str(getattr(model, "name", "")), "size": transform.size,
            "mean": list(transform.mean), "std": list(transform.std),
            "interpolation": transform.interpolation}  # fmt: skip
    write_json_atomic(meta_path, meta)
    write_checksum(graph)  # last: the graph counts as exported only once its checksum is there
    log.info("exported the image embedding to %s", graph)
    return graph


def _export(model: Any, size: int, path: Path) -> None:
    """torch.onnx.export of tower + projector, then ONNX Runtime's graph optimisations applied once and saved as
    the graph (portable ones: ORT_ENABLE_EXTENDED), so a later process's InferenceSession starts ~2x sooner."""
    import tempfile
    import warnings

    import onnxruntime as ort
    import torch

    from retrieval.fileio import atomic_path

    class Embed(torch.nn.Module):
        def __init__(self, inner: Any):
            super().__init__()
            self.inner = inner

        def forward(self, pixels: torch.Tensor) -> torch.Tensor:
            return self.inner.project_images(self.inner.image_features(pixels)).float()

    path.parent.mkdir(parents=True, exist_ok=True)
    before = os.environ.get("CXR_IMAGE_RUNTIME")
    os.environ["CXR_IMAGE_RUNTIME"] = "torch"  # trace the tower itself, not onnx_tower's session
    try:
        with tempfile.TemporaryDirectory(dir=path.parent) as tmp_dir, atomic_path(path) as tmp:
            plain = Path(tmp_dir) / "plain.onnx"
            with warnings.catch_warnings(), torch.no_grad():
                warnings.simplefilter("ignore")
                torch.onnx.export(Embed(model.cpu().eval()), (torch.zeros(1, 3, size, size),), str(plain),
                                  input_names=["pixels"], output_names=["embedding"],
                                  dynamic_axes={"pixels": {0: "batch"}, "embedding": {0: "batch"}}, dynamo=False,
                                  opset_version=17)  # fmt: skip
            opts = ort.SessionOptions()
            opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
            opts.optimized_model_filepath = str(tmp)
            opts.log_severity_level = 3
            ort.InferenceSession(str(plain), opts, providers=["CPUExecutionProvider"])
    finally:
        if before is None:
            os.environ.pop("CXR_IMAGE_RUNTIME", None)
        else:
            os.environ["CXR_IMAGE_RUNTIME"] = before
