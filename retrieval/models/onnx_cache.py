"""The folder of exported ONNX graphs and their checksums, shared by `onnx_tower` (a frozen CNN tower) and
`onnx_embedder` (a model's whole image embedding). Imports no torch, so a query answered through ONNX Runtime
never loads it.

Graphs live in `CXR_ONNX_DIR`, else `$CXR_HOME/onnx`, else `~/.cache/cxr-retrieval/onnx`. Each has a `.sha256`
file beside it, written after the graph; a graph is used only while its sha256 matches (`export_problem`), and
`cxr models verify` lists those that fail (`check_exports`).
"""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    if os.environ.get("CXR_ONNX_DIR"):
        return Path(os.environ["CXR_ONNX_DIR"])
    home = os.environ.get("CXR_HOME")
    return (Path(home) if home else Path.home() / ".cache" / "cxr-retrieval") / "onnx"


def sha_file(path: Path) -> Path:
    return path.with_name(path.name + ".sha256")


def write_checksum(path: Path) -> None:
    """Record the sha256 of the graph at `path` beside it (atomically), once the graph is complete."""
    from retrieval.fileio import atomic_path, sha256_file

    with atomic_path(sha_file(path)) as tmp:
        tmp.write_text(sha256_file(path) + "\n")


def export_problem(path: Path) -> str | None:
    """Why the export at `path` must not be used (None when its sha256 matches the one written beside it)."""
    from retrieval.fileio import sha256_file

    try:
        want = sha_file(path).read_text().strip()
    except OSError:
        return "no checksum beside it"
    return None if sha256_file(path) == want else "checksum mismatch"


def check_exports(folder: Path) -> list[str]:
    """One line per export in `folder` that fails its checksum (`cxr models verify`)."""
    found = sorted(Path(folder).glob("*.onnx")) if Path(folder).is_dir() else []
    return [f"{p}: ONNX export {why}; it will be exported again" for p in found if (why := export_problem(p))]
