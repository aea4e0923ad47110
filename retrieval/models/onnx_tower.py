"""ONNX Runtime for a frozen CNN image tower on the CPU: the same numbers (within 1.1e-5) 2.9x faster than channels_last
PyTorch, whose depthwise convolutions are slow on these cores (benchmarks/results/cnn_runtime_cpu.md).

Used only where it cannot change what is learned: inference (no autograd), on the CPU, for a tower none of whose
weights train. The graph is exported once per tower weights (`checkpoint.fingerprint_state`), input size and output
(pooled features or the last feature map) into `$CXR_HOME/onnx/` (default `~/.cache/cxr-retrieval/onnx/`;
`CXR_ONNX_DIR` overrides it), and reused by every later process. Each export has a `.sha256` file beside it; a
process checks it before its first session on that export, and an export that fails it (or has none) is exported
again with a warning. `cxr models verify` lists the exports that fail (`check_exports`; the folder
and the checksums are `onnx_cache`'s).
`CXR_IMAGE_RUNTIME=torch` turns it off; without the `onnxruntime` package the tower simply runs in PyTorch.
"""

from __future__ import annotations

import logging
import os
import threading
from pathlib import Path

import numpy as np
import torch
from torch import nn

from retrieval.models.onnx_cache import cache_dir, export_problem, write_checksum

log = logging.getLogger(__name__)
OUTPUTS = ("features", "fmap")
_SESSIONS: dict[tuple[str, int, str], object] = {}
_HASHES: dict[tuple, str] = {}  # (storage, in-place version) of every weight -> its fingerprint: hashed once
_LOCK = threading.Lock()


def enabled() -> bool:
    if os.environ.get("CXR_IMAGE_RUNTIME", "auto").lower() == "torch":
        return False
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        return False
    return True


class _Graph(nn.Module):
    """What gets exported: pixels -> pooled features (the tower) or -> the last feature map (the trunk)."""

    def __init__(self, tower: nn.Module, output: str):
        super().__init__()
        self.tower, self.output = tower, output

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        if self.output == "fmap":
            return self.tower.trunk.forward_features(pixels)
        return self.tower(pixels)


def _weights_hash(tower: nn.Module) -> str:
    """The tower's fingerprint, recomputed only when a weight was replaced or changed in place."""
    from retrieval.models.saved_model import fingerprint_state

    state = tower.state_dict()
    fast = tuple((k, v.data_ptr(), v._version) for k, v in state.items())
    if fast not in _HASHES:
        _HASHES.clear()
        _HASHES[fast] = fingerprint_state(state)
    return _HASHES[fast]


def _session(tower: nn.Module, size: int, output: str):
    key = (_weights_hash(tower), size, output)
    with _LOCK:
        if key in _SESSIONS:
            return _SESSIONS[key]
        import onnxruntime as ort

        path = cache_dir() / f"{key[0][:24]}-{size}-{output}.onnx"
        problem = export_problem(path) if path.is_file() else None
        if problem:
            log.warning("%s: %s; exporting the tower again", path, problem)
        if problem or not path.is_file():
            _export(tower, size, output, path)
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = torch.get_num_threads()
        opts.log_severity_level = 3
        session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        _SESSIONS[key] = session
        return session


def _export(tower: nn.Module, size: int, output: str, path: Path) -> None:
    import warnings

    from retrieval.fileio import atomic_path

    path.parent.mkdir(parents=True, exist_ok=True)
    graph = _Graph(tower, output).eval()
    example = torch.zeros(2, 3, size, size)
    with atomic_path(path) as tmp, warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            graph,
            (example,),
            str(tmp),
            input_names=["pixels"],
            output_names=["out"],
            dynamic_axes={"pixels": {0: "batch"}, "out": {0: "batch"}},
            dynamo=False,
            opset_version=17,
        )
    write_checksum(path)
    log.info("exported the image tower to %s", path)


def run(tower: nn.Module, pixels: torch.Tensor, output: str) -> torch.Tensor | None:
    """The tower's output for `pixels` through ONNX Runtime, or None where it must not or cannot be used (autograd
    on, a GPU, a trained weight, non-square or unexpected input, the runtime disabled or missing, export failed)."""
    if output not in OUTPUTS or torch.is_grad_enabled() or pixels.device.type != "cpu" or pixels.ndim != 4:
        return None
    if pixels.shape[-1] != pixels.shape[-2] or any(p.requires_grad for p in tower.parameters()) or not enabled():
        return None
    try:
        session = _session(tower, int(pixels.shape[-1]), output)
    except Exception as e:  # an export the exporter cannot do: stay in PyTorch, say so once
        log.warning("ONNX Runtime unavailable for this tower (%s: %s); using PyTorch", type(e).__name__, e)
        os.environ["CXR_IMAGE_RUNTIME"] = "torch"
        return None
    x = np.ascontiguousarray(pixels.float().numpy())
    return torch.from_numpy(session.run(None, {"pixels": x})[0])
