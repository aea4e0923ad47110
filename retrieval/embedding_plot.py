"""A 2-D map of image embeddings coloured normal vs abnormal (the clustering figure of seed 002)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np


def project_2d(x: np.ndarray, method: str = "auto", seed: int = 0) -> tuple[np.ndarray, str]:
    """(N, 2) coordinates: t-SNE (sklearn) for `auto` up to 5,000 points when sklearn is installed, else PCA.

    PCA is numpy's SVD of the centred data, so the plot works without sklearn."""
    x = np.asarray(x, dtype=np.float64)
    if method not in ("auto", "tsne", "pca"):
        raise ValueError(f"method must be auto, tsne or pca, got {method!r}")
    if method in ("auto", "tsne") and len(x) > 3:
        try:
            from sklearn.manifold import TSNE
        except ImportError:
            if method == "tsne":
                raise
        else:
            if method == "tsne" or len(x) <= 5000:
                perplexity = float(min(30.0, (len(x) - 1) / 3))
                tsne = TSNE(n_components=2, perplexity=perplexity, init="pca", random_state=seed)
                return tsne.fit_transform(x), "t-SNE"
    centred = x - x.mean(axis=0, keepdims=True)
    _, _, vt = np.linalg.svd(centred, full_matrices=False)
    return centred @ vt[:2].T, "PCA"


def plot_embeddings(
    panels: Mapping[str, np.ndarray],
    abnormal: np.ndarray,
    path: str | Path,
    method: str = "auto",
    seed: int = 0,
) -> Path:
    """Write a PNG with one scatter panel per named embedding set, normal (blue) vs abnormal (red)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from retrieval.fileio import atomic_path

    abnormal = np.asarray(abnormal, dtype=bool)
    path = Path(path)
    fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 5), squeeze=False)
    for ax, (name, emb) in zip(axes[0], panels.items(), strict=True):
        xy, used = project_2d(emb, method, seed)
        for mask, colour, label in ((~abnormal, "tab:blue", "normal"), (abnormal, "tab:red", "abnormal")):
            ax.scatter(xy[mask, 0], xy[mask, 1], s=8, c=colour, alpha=0.6, label=f"{label} ({mask.sum()})")
        ax.set_title(f"{name} ({used})")
        ax.set_xticks([])
        ax.set_yticks([])
        ax.legend(loc="best", fontsize=8)
    fig.suptitle("image embeddings: normal vs abnormal")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
    return path
