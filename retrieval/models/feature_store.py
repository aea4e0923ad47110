"""A store of a frozen tower's pooled (pre-projector) features, kept beside a saved model and keyed by a sha256 per
input: each text for the text tower (`text_features.safetensors`), each image file (its path, size and mtime) for
the image tower (`image_features.safetensors`).

Training writes them for the train and val inputs of every tower it kept frozen; `CXRModel.encode_texts` and the
image path (`image_stream.stream_images`) look inputs up there before running a tower, so indexing the training
studies right after training (`cxr demo`) encodes nothing twice. A store is valid only for the tower whose weights
hash (`checkpoint.fingerprint_state`) and precision it records: anything else is ignored, never trusted. The file
records a sha256 of its keys and features, checked on every load and by `cxr models verify`: a store that fails it
(or has none) is ignored with a warning, so the tower runs instead.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from retrieval.fileio import atomic_path

log = logging.getLogger(__name__)
TEXT_STORE = "text_features.safetensors"
IMAGE_STORE = "image_features.safetensors"


def text_digests(texts: Sequence[str]) -> np.ndarray:
    """(N, 32) uint8: the sha256 of each text (UTF-8)."""
    return _digests(str(t).encode() for t in texts)


def file_digests(paths: Sequence[str | Path]) -> np.ndarray:
    """(N, 32) uint8: the sha256 of each file's absolute path, size and mtime (an edited file gets a new key); a
    file that cannot be stat'ed gets an all-zero key, which no store holds."""
    keys = []
    for p in paths:
        try:
            st = os.stat(p)
            keys.append(f"{Path(p).resolve()}\0{st.st_size}\0{st.st_mtime_ns}".encode())
        except OSError:
            keys.append(None)
    return _digests(keys)


def _digests(keys) -> np.ndarray:
    keys = list(keys)
    out = np.zeros((len(keys), 32), dtype=np.uint8)
    for i, k in enumerate(keys):
        if k is not None:
            out[i] = np.frombuffer(hashlib.sha256(k).digest(), dtype=np.uint8)
    return out


def content_sha(digests: np.ndarray, features: torch.Tensor) -> str:
    """The sha256 a store records of its keys and features (float32 bytes)."""
    h = hashlib.sha256(np.ascontiguousarray(digests, dtype=np.uint8).tobytes())
    h.update(features.float().contiguous().numpy().tobytes())
    return h.hexdigest()


def save_store(path: Path, digests: np.ndarray, features: torch.Tensor, tower: str, precision: str) -> Path:
    """Write digests -> features (first occurrence of a repeated digest kept) for tower hash `tower`."""
    from safetensors.torch import save_file

    first: dict[bytes, int] = {}
    for i, d in enumerate(digests):
        first.setdefault(d.tobytes(), i)
    rows = list(first.values())
    tensors = {
        "sha256": torch.from_numpy(np.ascontiguousarray(digests[rows])),
        "features": features[rows].float().contiguous(),
    }
    meta = {"tower": tower, "precision": precision, "content_sha256": content_sha(digests[rows], tensors["features"])}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=meta)
    return path


def _read(path: Path) -> tuple[dict, np.ndarray, torch.Tensor]:
    """(metadata, keys, features) of a store whose checksum holds; a ValueError saying what is wrong otherwise."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            digests = f.get_tensor("sha256").numpy()
            feats = f.get_tensor("features")
    except Exception as e:  # safetensors raises several types for damaged files
        raise ValueError(f"unreadable ({type(e).__name__})") from None
    if "content_sha256" not in meta:
        raise ValueError("no checksum (written by an earlier release)")
    if content_sha(digests, feats) != meta["content_sha256"]:
        raise ValueError("checksum mismatch")
    return meta, digests, feats


def check_store(path: Path) -> str | None:
    """What is wrong with the store at `path` (None when its checksum holds): for `cxr models verify`."""
    try:
        _read(path)
    except ValueError as e:
        return f"{path}: feature cache {e}; it is ignored (only speed is lost): delete it or retrain to rebuild it"
    return None


def load_store(path: Path | None, tower: str, precision: str) -> dict[bytes, torch.Tensor]:
    """{sha256 digest: feature} when the store at `path` was made by the tower with hash `tower` at `precision`;
    an empty dict when there is none or it belongs to other weights, and (with a warning) when it fails its
    checksum or cannot be read: only speed is lost, never a changed feature used."""
    if path is None or not path.is_file():
        return {}
    try:
        meta, digests, feats = _read(path)
    except ValueError as e:
        log.warning("%s: feature cache %s; ignoring it (the tower runs instead)", path, e)
        return {}
    if meta.get("tower") != tower or meta.get("precision", "fp32") != precision:
        return {}
    return {d.tobytes(): feats[i] for i, d in enumerate(digests)}
