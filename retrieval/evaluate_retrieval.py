"""Retrieval quality: image->report, report->image and image->image, with the baselines in the same table.

Definitions (every metric is a plain numpy function in `retrieval/retrieval_metrics.py`, so a reader can check
it; the split's images and studies come from `retrieval/data/split_items.py`):

- Gallery and queries. image->report: each image of the split queries the split's reports (one per study).
  report->image: each study's report queries the split's images. image->image: each image queries the other
  images, *excluding every image of its own patient* (so its own image and study never count).
- Exact relevance (cross-modal only): the gallery item belongs to the query's own study. Recall@K = fraction
  of queries with an exact hit in the top K; MRR = mean of 1/rank of the first exact hit; mAP_exact = mean
  average precision with exact relevance (for image->report, one relevant report, so it equals MRR).
- Label relevance: the gallery item's label set *overlaps* the query's (shares at least one label; "No
  Finding" counts as a label, so normal retrieves normal and an abnormal study never matches a normal one).
  LP@K = label precision@K = mean fraction of the top K that overlap; mAP_label = mean average precision with
  overlap relevance. LPx@K = the strict version: fraction of the top K whose label set is *identical*.
- Average precision of one query = mean over its relevant items of the precision at their rank (sklearn's
  `average_precision_score` without ties); queries without any relevant item are left out of the mean.
- Per label (table): for each label L, over the queries whose set contains L: P@K = fraction of the top K that
  contain L, AP = average precision with relevance "contains L".
- Ties in score are broken by gallery order (stable sort), so results are deterministic.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from retrieval.data.split_items import SplitItems, split_items
from retrieval.labels import NO_FINDING, abnormal_rows
from retrieval.retrieval_metrics import (
    mean_average_precision,
    mean_reciprocal_rank,
    overlap_matrix,
    precision_at_k,
    ranked_relevance,
    recall_at_k,
    same_set_matrix,
)

KS: tuple[int, ...] = (1, 5, 10)
DIRECTIONS: tuple[str, ...] = ("image->report", "report->image", "image->image")


def _metrics(ranked_exact: np.ndarray | None, ranked_label: np.ndarray, ranked_set: np.ndarray, ks) -> dict:
    out: dict[str, float | None] = {}
    for k in ks:
        out[f"R@{k}"] = None if ranked_exact is None else recall_at_k(ranked_exact, k)
    out["MRR"] = None if ranked_exact is None else mean_reciprocal_rank(ranked_exact)
    out["mAP_exact"] = None if ranked_exact is None else mean_average_precision(ranked_exact)
    for k in ks:
        out[f"LP@{k}"] = precision_at_k(ranked_label, k)
    for k in ks:
        out[f"LPx@{k}"] = precision_at_k(ranked_set, k)
    out["mAP_label"] = mean_average_precision(ranked_label)
    return out


def _per_label(
    scores: np.ndarray,
    q_labels: np.ndarray,
    g_labels: np.ndarray,
    names: Sequence[str],
    exclude: np.ndarray | None,
    k: int,
) -> dict[str, dict[str, float]]:
    out = {}
    for j, name in enumerate(names):
        rows = np.flatnonzero(q_labels[:, j])
        if rows.size == 0:
            continue
        rel = np.broadcast_to(g_labels[:, j], (rows.size, g_labels.shape[0]))
        ranked = ranked_relevance(scores[rows], rel, None if exclude is None else exclude[rows])
        out[name] = {
            "queries": int(rows.size),
            "gallery": int(g_labels[:, j].sum()),
            f"P@{k}": precision_at_k(ranked, k),
            "AP": mean_average_precision(ranked),
        }
    return out


def evaluate_embeddings(
    items: SplitItems,
    image_emb: np.ndarray,
    report_emb: np.ndarray,
    ks: Sequence[int] = KS,
    per_label_k: int = 5,
) -> dict[str, Any]:
    """Metrics of one system (its image and report embeddings) in every direction, plus per-label tables."""
    img = np.asarray(image_emb, dtype=np.float32)
    rep = np.asarray(report_emb, dtype=np.float32)
    il, sl, names = items.image_labels, items.study_labels, items.label_names
    exact_i2r = items.image_study[:, None] == np.arange(len(items.study_ids))[None, :]
    same_patient = items.image_patient[:, None] == items.image_patient[None, :]
    setups = {
        "image->report": (img @ rep.T, il, sl, exact_i2r, None),
        "report->image": (rep @ img.T, sl, il, exact_i2r.T, None),
        "image->image": (img @ img.T, il, il, None, same_patient),
    }
    metrics, per_label = {}, {}
    for direction, (scores, ql, gl, exact, exclude) in setups.items():
        ranked_exact = None if exact is None else ranked_relevance(scores, exact, exclude)
        ranked_label = ranked_relevance(scores, overlap_matrix(ql, gl), exclude)
        ranked_set = ranked_relevance(scores, same_set_matrix(ql, gl), exclude)
        metrics[direction] = _metrics(ranked_exact, ranked_label, ranked_set, ks)
        metrics[direction]["queries"] = int(scores.shape[0])
        metrics[direction]["gallery"] = int(scores.shape[1])
        per_label[direction] = _per_label(scores, ql, gl, names, exclude, per_label_k)
    return {"metrics": metrics, "per_label": per_label}


# ------------------------------------------------------------------------------------------ models


def embed_items(
    model: Any,
    items: SplitItems,
    batch_size: int = 32,
    device: str | None = None,
    precision: str = "fp32",
    show_progress_bar: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """(image embeddings, report embeddings) of a split with the model's one encode API."""
    options = dict(batch_size=batch_size, device=device, precision=precision, show_progress_bar=show_progress_bar)
    return model.encode_images(items.image_paths, **options), model.encode_texts(items.reports, **options)


def random_embeddings(n_images: int, n_reports: int, dim: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """The random baseline: seeded Gaussian vectors, L2-normalised."""
    rng = np.random.default_rng(seed)
    out = []
    for n in (n_images, n_reports):
        v = rng.standard_normal((n, dim)).astype(np.float32)
        out.append(v / np.linalg.norm(v, axis=1, keepdims=True))
    return out[0], out[1]


def zero_shot_model(model: Any, seed: int = 0, device: str | None = None) -> Any:
    """The same base model (`model.name`: what a saved folder was built from, e.g. `cxr-small`) with a freshly
    initialised (untrained) projector, seeded."""
    import torch

    from retrieval.models import load_model

    torch.manual_seed(seed)
    return load_model(str(model.name), device=device)


def evaluate_retrieval(
    model: Any,
    manifest: str | Path | pd.DataFrame,
    split: str | None = "test",
    batch_size: int = 32,
    device: str | None = None,
    precision: str = "fp32",
    baselines: bool = True,
    seed: int = 0,
    ks: Sequence[int] = KS,
    show_progress_bar: bool = False,
    plot: str | Path | None = None,
) -> dict[str, Any]:
    """Evaluate `model` (and the zero-shot and random baselines) on a manifest split.

    Returns {"split", "images", "studies", "skipped", "systems": {name: {"metrics", "per_label"}}, ...}.
    With `plot`, also writes a 2-D map of the image embeddings (normal vs abnormal) to that PNG."""
    from retrieval.data.manifest import read_manifest

    df = manifest if isinstance(manifest, pd.DataFrame) else read_manifest(manifest)
    items = split_items(df, split)
    kw = dict(batch_size=batch_size, device=device, precision=precision, show_progress_bar=show_progress_bar)
    embeddings = {"model": embed_items(model, items, **kw)}
    if baselines:
        zs = zero_shot_model(model, seed=seed, device=device)
        embeddings["zero-shot"] = embed_items(zs, items, **kw)
        dim = embeddings["model"][0].shape[1]
        embeddings["random"] = random_embeddings(len(items.image_ids), len(items.reports), dim, seed)
    systems = {name: evaluate_embeddings(items, img, rep, ks) for name, (img, rep) in embeddings.items()}
    result: dict[str, Any] = {
        "model": str(getattr(model, "name", "")),
        "fingerprint": str(getattr(model, "fingerprint", "")),
        "split": split,
        "images": len(items.image_ids),
        "studies": len(items.study_ids),
        "patients": int(len(set(items.image_patient.tolist()))),
        "abnormal_images": int(abnormal_of(items).sum()),
        "skipped": items.skipped,
        "labelled_by_labeler": items.labelled_by_labeler,
        "systems": systems,
        "definitions": DEFINITIONS,
    }
    if plot is not None:
        from retrieval.embedding_plot import plot_embeddings

        panels = {name: img for name, (img, _) in embeddings.items() if name != "random"}
        result["plot"] = str(plot_embeddings(panels, abnormal_of(items), plot, seed=seed))
    return result


def abnormal_of(items: SplitItems) -> np.ndarray:
    """(I,) bool: the image's label set has a label other than "No Finding"."""
    return abnormal_rows(items.image_labels, items.label_names.index(NO_FINDING))


DEFINITIONS: dict[str, str] = {
    "R@K": "cross-modal: fraction of queries whose own study is in the top K",
    "MRR": "cross-modal: mean 1/rank of the query's own study",
    "mAP_exact": "cross-modal: mean average precision, relevant = same study",
    "LP@K": "label precision@K: mean fraction of the top K whose label set overlaps the query's",
    "LPx@K": "strict label precision@K: mean fraction of the top K with an identical label set",
    "mAP_label": "mean average precision, relevant = label sets overlap",
    "image->image": "excludes every image of the query's own patient",
    "per_label": "queries containing label L: P@K = fraction of top K containing L, AP with that relevance",
}


def format_table(result: dict[str, Any], ks: Sequence[int] = KS) -> str:
    """A plain-text table: one row per (direction, system), the metrics as columns."""
    cols = [f"R@{k}" for k in ks] + ["MRR", "mAP_exact"] + [f"LP@{k}" for k in ks] + ["LPx@5", "mAP_label"]
    header = f"{'direction':<14} {'system':<10} " + " ".join(f"{c:>9}" for c in cols)
    lines = [header, "-" * len(header)]
    for direction in DIRECTIONS:
        for system, res in result["systems"].items():
            m = res["metrics"][direction]
            cells = " ".join(f"{'-' if m.get(c) is None else format(m[c], '.3f'):>9}" for c in cols)
            lines.append(f"{direction:<14} {system:<10} {cells}")
    return "\n".join(lines)


def format_per_label(result: dict[str, Any], system: str = "model", direction: str = "image->report") -> str:
    """Per-label table of one system and direction."""
    table = result["systems"][system]["per_label"][direction]
    if not table:
        return ""
    k_key = next(k for k in next(iter(table.values())) if k.startswith("P@"))
    lines = [f"{'label':<28} {'queries':>8} {'gallery':>8} {k_key:>7} {'AP':>7}"]
    for name, row in sorted(table.items(), key=lambda kv: -kv[1]["queries"]):
        lines.append(f"{name:<28} {row['queries']:>8} {row['gallery']:>8} {row[k_key]:>7.3f} {row['AP']:>7.3f}")
    return "\n".join(lines)
