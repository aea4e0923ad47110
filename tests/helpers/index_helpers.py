"""Helpers for the index tests (no tests here): a tiny deterministic encoder and a synthetic image corpus.

`FakeModel` follows the CXRModel contract the index uses (`name`, `embed_dim`, `fingerprint`,
`image_transform()`, `image_features`, `project_images`, `encode_texts`) with seeded random weights, so FAISS,
build and resume behaviour can be tested in milliseconds. It lives at module level so DataLoader workers can
unpickle its transform.
"""

from __future__ import annotations

import hashlib
import os
import time
import zlib
from pathlib import Path

import numpy as np
import pandas as pd
import torch

FEATURES = 64


class FakeTransform:
    """HxW float image -> (3, 8, 8) tensor by block averaging (picklable)."""

    def __call__(self, img: np.ndarray) -> torch.Tensor:
        t = torch.as_tensor(np.asarray(img, dtype=np.float32))[None, None]
        small = torch.nn.functional.adaptive_avg_pool2d(t, 8)[0]
        return small.expand(3, 8, 8).contiguous()


def _text_features(text: str) -> np.ndarray:
    v = np.zeros(FEATURES, dtype=np.float32)
    t = f"  {text.lower()}  "
    for i in range(len(t) - 2):
        v[zlib.crc32(t[i : i + 3].encode()) % FEATURES] += 1.0
    return v


class FakeModel(torch.nn.Module):
    """A seeded linear 'encoder' with the CXRModel interface the index needs."""

    def __init__(self, seed: int = 0, dim: int = 32):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.w_img = torch.nn.Parameter(torch.randn(FEATURES, dim, generator=g), requires_grad=False)
        self.w_txt = torch.nn.Parameter(torch.randn(FEATURES, dim, generator=g), requires_grad=False)
        self.name = f"fake-{seed}"
        self.embed_dim = dim
        digest = hashlib.sha256(self.w_img.numpy().tobytes() + self.w_txt.numpy().tobytes()).hexdigest()
        self.fingerprint = digest[:16]
        self.delay = float(os.environ.get("CXR_FAKE_DELAY", "0"))

    def image_transform(self) -> FakeTransform:
        return FakeTransform()

    def image_features(self, pixels: torch.Tensor) -> torch.Tensor:
        if self.delay:
            time.sleep(self.delay)
        return pixels[:, 0].reshape(len(pixels), -1).float() - 0.5

    # In float64, rounded to float32 at the end: a float32 matmul's last bit depends on the batch's size and the
    # thread count (OMP_NUM_THREADS=1 in a killed-build subprocess or a Ray actor, 2 here), which made a resumed
    # build differ from an uninterrupted one by 3e-8 and broke ties between identical reports differently.
    def project_images(self, feats: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.normalize(feats.double() @ self.w_img.double(), dim=-1).float()

    def encode_texts(self, texts, batch_size: int = 32, **_) -> np.ndarray:
        feats = torch.as_tensor(np.stack([_text_features(t) for t in texts]), dtype=torch.float64)
        out = torch.nn.functional.normalize(feats @ self.w_txt.double(), dim=-1)
        return np.ascontiguousarray(out.numpy(), dtype=np.float32)


REPORTS = [
    "Right lower lobe consolidation consistent with pneumonia.",
    "No acute cardiopulmonary abnormality.",
    "Cardiomegaly with small bilateral pleural effusions.",
    "Left apical pneumothorax.",
    "",
]


def make_corpus(folder: Path, n: int = 40, bad: bool = True, seed: int = 0) -> Path:
    """PNG images (random textures, 2 per study, 2 studies per patient) + manifest.parquet; with `bad`, one
    zero-byte and one corrupt image are added. Returns the manifest path (image paths relative to it)."""
    from PIL import Image

    from retrieval.data.manifest import write_manifest

    rng = np.random.default_rng(seed)
    img_dir = folder / "images"
    img_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        arr = (rng.random((24 + i % 5, 20 + i % 7)) * 255).astype(np.uint8)
        Image.fromarray(arr).save(img_dir / f"im{i:04d}.png")
        rows.append(_row(i, f"images/im{i:04d}.png"))
    if bad:
        (img_dir / "empty.png").write_bytes(b"")
        (img_dir / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + rng.bytes(64))
        rows.insert(3, _row(n, "images/empty.png"))
        rows.insert(7, _row(n + 1, "images/corrupt.png"))
    manifest = folder / "manifest.parquet"
    write_manifest(pd.DataFrame(rows), manifest)
    return manifest


def _row(i: int, path: str) -> dict:
    study = i // 2
    return {
        "image_id": f"img{i:04d}",
        "study_id": f"st{study:04d}",
        "patient_id": f"pt{study // 2:04d}",
        "image_path": path,
        "view": "PA",
        "report": REPORTS[study % len(REPORTS)],
        "labels": ["Pneumonia"] if study % len(REPORTS) == 0 else ["No Finding"],
        "split": "train",
        "source": "synthetic",
    }
