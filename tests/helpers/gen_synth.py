"""Synthetic data for the generation tests: tiny images whose bright box matches their label and report, a
manifest over them, and an index folder (image vectors from a frozen patch encoder) for the RAG path."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

REPORTS = {
    "Cardiomegaly": "the heart is enlarged. cardiomegaly.",
    "Pleural Effusion": "there is a right pleural effusion.",
    "No Finding": "the heart is normal. the lungs are clear.",
}
BOXES = {
    "Cardiomegaly": (0.30, 0.45, 0.75, 0.85),
    "Pleural Effusion": (0.05, 0.60, 0.40, 0.95),
}


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """One torch thread: on a loaded 2-core machine, more threads make small matmuls far slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def make_manifest(root: Path, n: int = 36, size: int = 64, seed: int = 0) -> pd.DataFrame:
    """n studies (one image each, one patient per two studies), 2/3 train and 1/3 test by patient."""
    rng = np.random.default_rng(seed)
    (root / "img").mkdir(parents=True, exist_ok=True)
    rows = []
    names = list(REPORTS)
    for i in range(n):
        label = names[i % 3]
        img = rng.normal(0.2, 0.03, (size, size))
        boxes = [{"label": "Right Lung", "x1": 0.05, "y1": 0.1, "x2": 0.45, "y2": 0.9}]
        if label in BOXES:
            x1, y1, x2, y2 = BOXES[label]
            img[int(y1 * size) : int(y2 * size), int(x1 * size) : int(x2 * size)] += 0.6
            boxes.append({"label": label, "x1": x1, "y1": y1, "x2": x2, "y2": y2})
        path = root / "img" / f"{i}.png"
        Image.fromarray((np.clip(img, 0, 1) * 255).astype(np.uint8)).save(path)
        patient = i // 2
        rows.append(
            {
                "image_id": f"img{i}",
                "study_id": f"s{i}",
                "patient_id": f"p{patient}",
                "image_path": f"img/{i}.png",
                "view": "PA",
                "report": REPORTS[label],
                "findings": REPORTS[label],
                "impression": "",
                "labels": [label],
                "boxes": boxes,
                "split": "test" if patient % 3 == 2 else "train",
                "source": "synthetic",
            }
        )
    df = pd.DataFrame(rows)
    df.attrs["root"] = str(root)
    return df


class SynthRetrievalModel:
    """Stands in for the retrieval model: mean-pooled frozen patch features, L2-normalised."""

    name = "synthetic"
    fingerprint = "synthetic"
    embed_dim = 32

    def __init__(self):
        from generation.model.encoders import FrozenPatchEncoder

        self.enc = FrozenPatchEncoder(seed=7, image_size=64, patch=8, dim=32)

    def encode_images(self, images, **kwargs) -> np.ndarray:
        from generation.model.encoders import encode_visual
        from retrieval.data.image_io import read_image

        arrays = [read_image(x) if isinstance(x, str | Path) else x for x in images]
        v = encode_visual([self.enc], arrays)[0].mean(1).numpy().astype(np.float32)
        return v / np.linalg.norm(v, axis=1, keepdims=True)


def make_index(df: pd.DataFrame, out: Path) -> Path:
    """An index folder over every row, vectors from SynthRetrievalModel (no trained model needed)."""
    import faiss

    from index.generations import save_index
    from index.rows import prepare_rows
    from retrieval.data.manifest import resolve_image_path

    model = SynthRetrievalModel()
    v = model.encode_images([resolve_image_path(df.attrs["root"], p) for p in df["image_path"]])
    images = faiss.IndexFlatIP(v.shape[1])
    images.add(v)
    reports = faiss.IndexFlatIP(v.shape[1])
    reports.add(v)
    meta = prepare_rows(df)
    meta.insert(0, "row_id", np.arange(len(meta)))
    info = {
        "factory": "Flat",
        "model": {"name": model.name, "fingerprint": model.fingerprint, "embed_dim": 32},
    }
    save_index(out, images, reports, meta, info)
    return out


# The tiny Llama (`lm_overrides`): TINY_LM for the runs that train, UNIT_LM for the tests that only build a VLM.
TINY_LM = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 2}
UNIT_LM = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2}


def tiny_vlm_config(steps: int, **changes):
    """The VLM training config of the tests: one frozen patch encoder, the tiny Llama (TINY_LM), 2 exemplars, a 4x4
    visual grid; `changes` override any field."""
    from generation.training.train import VLMTrainConfig

    base = dict(encoders=["patch:1"], batch_size=8, lm_path="tiny", lm_overrides=TINY_LM, rag_k=2, visual_grid=4)
    return VLMTrainConfig(**(base | dict(steps=steps, lr=3e-3, checkpoint_every=1000) | changes))
