"""Clustered synthetic corpora for the index tuning tests (no tests here): 8x8 images around given centres (the
FakeModel maps them to clustered vectors), written as 16-bit PNGs with a manifest, and the naive exact-search
reference that recall is measured against."""

from __future__ import annotations

from pathlib import Path

import faiss
import numpy as np
import pandas as pd
from index_helpers import FakeModel, _row

from retrieval.data.manifest import write_manifest


def clustered_pixels(n: int, centres: np.ndarray, seed: int, noise: float = 0.25) -> np.ndarray:
    """n 8x8 images in [0, 1] drawn around the given centres: the FakeModel maps them to clustered vectors."""
    rng = np.random.default_rng(seed)
    x = centres[rng.integers(0, len(centres), n)] + noise * rng.normal(size=(n, 64))
    return np.clip(x, 0, 1).reshape(n, 8, 8)


def write_corpus(folder: Path, pixels: np.ndarray) -> Path:
    """16-bit grey PNGs (so the pixels survive the round trip) and their manifest."""
    from PIL import Image

    (folder / "images").mkdir(parents=True, exist_ok=True)
    rows = []
    for i, img in enumerate(pixels):
        Image.fromarray((img * 65535).astype(np.uint16)).save(folder / "images" / f"im{i:05d}.png")
        rows.append(_row(i, f"images/im{i:05d}.png"))
    manifest = folder / "manifest.parquet"
    write_manifest(pd.DataFrame(rows), manifest)
    return manifest


def embed(model: FakeModel, pixels: np.ndarray, folder: Path) -> np.ndarray:
    """Query vectors the way the index's were made: PNG files through the image pipeline."""
    from retrieval.models.image_stream import encode_image_items

    manifest = write_corpus(folder, pixels)
    paths = [str(manifest.parent / "images" / f"im{i:05d}.png") for i in range(len(pixels))]
    vectors, _, bad = encode_image_items(model, paths, output="embeddings", on_error="raise")
    assert not bad
    return np.ascontiguousarray(vectors, dtype=np.float32)


def stored(index) -> np.ndarray:
    """Every vector of an index, exactly (IVF-Flat needs its direct map for that)."""
    try:
        faiss.extract_index_ivf(index).make_direct_map()
    except RuntimeError:
        pass
    return index.reconstruct_n(0, index.ntotal)


def exact_top(x: np.ndarray, q: np.ndarray, k: int) -> np.ndarray:
    """Naive reference: every inner product, sorted."""
    return np.argsort(-(q @ x.T), axis=1, kind="stable")[:, :k]


def recall_at(found: np.ndarray, truth: np.ndarray) -> float:
    return float(np.mean([len(set(f) & set(t)) / len(t) for f, t in zip(found, truth, strict=True)]))
