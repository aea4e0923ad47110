"""Helpers for the reliability tests, the fuzz tests and benchmarks/reliability.py (no tests here): small indexes
from random unit vectors, a float DICOM writer, and bit flips."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd


def unit_vectors(n: int, d: int, seed: int = 0) -> np.ndarray:
    x = np.random.default_rng(seed).normal(size=(n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def meta_frame(n: int) -> pd.DataFrame:
    """Meta rows with text that a flipped bit could change silently (report, patient_id)."""
    return pd.DataFrame(
        {
            "row_id": np.arange(n, dtype=np.int64),
            "image_id": [f"i{i}" for i in range(n)],
            "study_id": [f"s{i // 2}" for i in range(n)],
            "patient_id": [f"p{i // 4}" for i in range(n)],
            "image_path": [f"/x/{i}.png" for i in range(n)],
            "view": "PA",
            "report": [f"report {i // 2}: no acute cardiopulmonary abnormality" for i in range(n)],
            "labels": [["Edema"] if i % 3 == 0 else ["No Finding"] for i in range(n)],
            "split": "train",
            "source": "synthetic",
            "has_report": True,
        }
    )


def vector_index(out: Path, n: int = 200, d: int = 16, factory: str = "Flat", seed: int = 0) -> Path:
    """A committed index generation over random unit vectors (no model, no images)."""
    from index import generations
    from index.factory import build_from_vectors

    x = unit_vectors(n, d, seed)
    images, factory = build_from_vectors(x, factory)
    reports, _ = build_from_vectors(unit_vectors(n, d, seed + 1), factory)
    info = {"factory": factory, "model": {"name": "vec", "fingerprint": "f00d", "embed_dim": d}}
    return generations.save_index(out, images, reports, meta_frame(n), info)


def flip_bit(path: Path, rng: np.random.Generator) -> tuple[int, int]:
    """Flip one random bit of a file in place; returns (byte offset, bit)."""
    data = bytearray(path.read_bytes())
    pos, bit = int(rng.integers(len(data))), int(rng.integers(8))
    data[pos] ^= 1 << bit
    path.write_bytes(bytes(data))
    return pos, bit


def float_dicom(path: Path, pixels: np.ndarray, **tags) -> Path:
    """A DICOM with 32-bit float pixel data (FloatPixelData), e.g. a parametric map or a processed image."""
    import pydicom
    from dicom_maker import write_dicom

    write_dicom(path, np.asarray(pixels, dtype=np.float32), sop_class="1.2.840.10008.5.1.4.1.1.30", **tags)
    assert pydicom.dcmread(path).pixel_array.dtype.kind == "f"  # parametric map storage
    return path
