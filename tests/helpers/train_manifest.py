"""A synthetic labelled manifest for the training tests (no tests here): images whose picture and report agree on
one of four labels."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

SENTENCES = {
    "No Finding": ["The lungs are clear.", "No acute cardiopulmonary abnormality.", "Normal chest."],
    "Cardiomegaly": ["The heart is enlarged.", "Cardiomegaly is present.", "Enlarged cardiac silhouette."],
    "Pleural Effusion": [
        "Left pleural effusion.",
        "There is a small left effusion.",
        "Blunted left costophrenic angle.",
    ],
    "Pneumothorax": ["Right apical pneumothorax.", "There is a right pneumothorax.", "Pneumothorax on the right."],
}


def make_manifest(root: Path, n: int, seed: int = 0, size: int = 64) -> Path:
    """`n` synthetic studies (one image each) whose picture and report agree on the label:
    a bright central blob (cardiomegaly), a bright lower-left band (effusion), a dark upper-right patch
    (pneumothorax), or nothing (normal). Patients split 70/15/15."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    labels = list(SENTENCES)
    rows = []
    for i in range(n):
        label = labels[i % len(labels)]
        img = rng.normal(0.45, 0.06, (size, size))
        s = size // 8
        if label == "Cardiomegaly":
            img[3 * s : 6 * s, 2 * s : 6 * s] += 0.35
        elif label == "Pleural Effusion":
            img[5 * s :, : 4 * s] += 0.35
        elif label == "Pneumothorax":
            img[: 3 * s, 4 * s :] -= 0.3
        Image.fromarray((np.clip(img, 0, 1) * 255).astype(np.uint8)).save(root / f"img{i}.png")
        text = " ".join(rng.choice(SENTENCES[label], size=2, replace=False)) + f" Study {i}."
        split = "train" if i % 20 < 14 else "val" if i % 20 < 17 else "test"
        rows.append(
            {
                "image_id": f"i{i}",
                "study_id": f"s{i}",
                "patient_id": f"p{i}",
                "image_path": f"img{i}.png",
                "report": text,
                "labels": [label],
                "split": split,
            }
        )
    from retrieval.data.manifest import write_manifest

    path = root / "manifest.parquet"
    write_manifest(pd.DataFrame(rows), path)
    return path
