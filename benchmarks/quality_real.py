"""Retrieval quality on real images (../shared/data), with honest baselines and 95% bootstrap intervals.

The importers' patient-disjoint splits: each test image queries the train+val images (image -> image, its own
patient never counted); P@5 = the share of the top 5 that share the query's key:
- covid-cxr: the same finding (metadata `finding`: COVID-19, SARS, Pneumocystis, ...; rows whose finding is
  `todo` or `Unknown` are left out), and the same view (PA vs AP);
- TBX11K: the same lesion side (left, right or both lungs, from the boxes).
Systems: cxr-small trained on covid-cxr's train split (`cxr train`'s defaults), the same with the image tower's
last 2 stages fine-tuned (`--unfreeze-last 2 --unfreeze-towers image`), and on augmented images (`--augment`,
fewer epochs: the tower runs every epoch), cxr-small with its untrained projector, and the frozen tower's own
features (no projector); the same for cxr-base (EfficientNet-Lite2 at its native 260 px, the other tower that runs
offline) trained, untrained and frozen: the input-size and tower ablation.
Baselines in the same run:
- random ranking: each query's expected P@5 under a random order (its key's share of the gallery);
- image-free training prior: every query gets the gallery's most common key (labels by prevalence);
- answers shuffled between test images: the best system's top 5 given to another test query (a seeded
  derangement), so a system that ignores the image scores like it.
Every figure carries a 95% percentile bootstrap interval over the queries (retrieval/bootstrap.py).
Run through `benchmarks/retrieval_quality.py real`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from benchmarks.common import markdown_table

UNKNOWN_FINDINGS = ("todo", "Unknown", "")
K = 5


def _side(boxes: list[dict]) -> str:
    """Lesion side from YOLO boxes in image coordinates (a PA film: image left = the patient's right lung)."""
    sides = {"right" if (b["x1"] + b["x2"]) / 2 < 0.5 else "left" for b in boxes if "x1" in b}
    return "both" if len(sides) == 2 else (sides.pop() if sides else "none")


def top_keys(vectors: np.ndarray, df: pd.DataFrame, key: str) -> tuple[np.ndarray, np.ndarray]:
    """(query keys, (n_test, K) keys of each test query's top K gallery images, own patient excluded)."""
    is_test = (df["split"] == "test").to_numpy()
    q, g = vectors[is_test], vectors[~is_test]
    qk, gk = df[key].to_numpy()[is_test], df[key].to_numpy()[~is_test]
    qp, gp = df["patient_id"].to_numpy()[is_test], df["patient_id"].to_numpy()[~is_test]
    scores = q @ g.T
    scores[qp[:, None] == gp[None, :]] = -np.inf
    order = np.argsort(-scores, axis=1, kind="stable")[:, :K]
    return qk, gk[order]


def baselines(df: pd.DataFrame, key: str, best_top: np.ndarray) -> dict[str, np.ndarray]:
    """Per-query P@K of the random ranking (expected), the image-free prior and the shuffled answers."""
    is_test = (df["split"] == "test").to_numpy()
    qk, gk = df[key].to_numpy()[is_test], df[key].to_numpy()[~is_test]
    qp, gp = df["patient_id"].to_numpy()[is_test], df["patient_id"].to_numpy()[~is_test]
    random = np.array([np.mean(gk[gp != p] == k) for k, p in zip(qk, qp, strict=True)])
    majority = pd.Series(gk).value_counts().index[0]
    prior = (qk == majority).astype(float)
    rng = np.random.default_rng(0)
    perm = np.arange(len(qk))
    while len(qk) > 1 and np.any(perm == np.arange(len(qk))):  # a derangement: no query keeps its own answer
        perm = rng.permutation(len(qk))
    shuffled = np.mean(best_top[perm] == qk[:, None], axis=1)
    return {"random ranking (expected)": random, f"image-free prior (always '{majority}')": prior,
            "answers shuffled between test images": shuffled}  # fmt: skip


def unit_rows(x: np.ndarray) -> np.ndarray:
    """Each row scaled to unit length (cosine = inner product), a zero row left at zero."""
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def _frozen_features(model: Any, paths: list[str]) -> np.ndarray:
    """The image tower's pooled features, L2-normalised (no projector)."""
    from retrieval.models.image_stream import encode_image_items

    feats, _, _ = encode_image_items(model, paths, output="features", on_error="raise")
    return unit_rows(np.asarray(feats, dtype=np.float32))


def _table(df: pd.DataFrame, key: str, systems: dict[str, np.ndarray]) -> dict[str, Any]:
    """Every system's and baseline's per-query P@K with its interval; the best system decides the shuffle."""
    from retrieval.bootstrap import interval

    per_query, tops = {}, {}
    for name, vectors in systems.items():
        qk, tops[name] = top_keys(vectors, df, key)
        per_query[name] = np.mean(tops[name] == qk[:, None], axis=1)
    best = max(per_query, key=lambda n: per_query[n].mean())
    per_query |= baselines(df, key, tops[best])
    rows = {name: interval(v).record() for name, v in per_query.items()}
    rand = interval(per_query["random ranking (expected)"])
    for name, rec in rows.items():
        rec["above random"] = bool(rec["low"] > rand.high)
    test = df[df["split"] == "test"]
    counts = {"keys (test)": test[key].value_counts().to_dict(), "keys (all)": df[key].value_counts().to_dict()}
    return {"systems": rows, "shuffled from": best, "test queries": len(test), **counts}


def _paths(df: pd.DataFrame) -> list[str]:
    from retrieval.data.manifest import resolve_image_path

    return [str(resolve_image_path(df.attrs.get("root"), p)) for p in df["image_path"]]


def run_real(data: Path, epochs: int, work: Path, aug_epochs: int = 3) -> dict[str, Any]:
    """The tables; `aug_epochs`: the augmented fine-tuning runs the whole tower every epoch (about 5 CPU minutes an
    epoch on a loaded 2-core machine), so it gets fewer epochs than the runs on cached features."""
    from retrieval.data.importers import import_source
    from retrieval.models import load_model
    from retrieval.training import train

    covid = import_source("covid-cxr", data / "covid-cxr")
    covid.attrs["root"] = str(data / "covid-cxr")
    covid["view_key"] = covid["view"].astype(str).str.upper().str.replace(" ", "").str.replace("SUPINE", "")
    trained = train(covid, "cxr-small", work / "covid-small", epochs=epochs, seed=0, show_progress=False, fresh=True)
    common = dict(seed=0, show_progress=False, fresh=True, unfreeze_last=2, unfreeze_towers=("image",))
    tuned = train(covid, "cxr-small", work / "covid-small-tuned", epochs=epochs, **common)  # the front cached
    augmented = train(covid, "cxr-small", work / "covid-small-aug", epochs=aug_epochs, augment=True, **common)
    untrained = load_model("cxr-small")
    base = train(covid, "cxr-base", work / "covid-base", epochs=epochs, seed=0, show_progress=False, fresh=True)
    base_untrained = load_model("cxr-base")
    paths = _paths(covid)
    vectors = {
        f"cxr-small trained on covid-cxr (early stop on {trained.info['monitor']})": trained.model.encode_images(paths),
        "cxr-small, last 2 stages fine-tuned": tuned.model.encode_images(paths),
        f"cxr-small, last 2 stages fine-tuned with augmentation ({aug_epochs} epochs)": augmented.model.encode_images(
            paths
        ),
        "cxr-small untrained projector": untrained.encode_images(paths),
        "frozen tower features (no projector)": _frozen_features(untrained, paths),
        f"cxr-base (Lite2, 260 px) trained on covid-cxr (early stop on {base.info['monitor']})": (
            base.model.encode_images(paths)
        ),
        "cxr-base untrained projector": base_untrained.encode_images(paths),
        "cxr-base frozen tower features (no projector)": _frozen_features(base_untrained, paths),
    }
    known = ~covid["finding"].astype(str).str.strip().isin(UNKNOWN_FINDINGS).to_numpy()
    finding = covid[known].copy()
    finding.attrs = covid.attrs
    out: dict[str, Any] = {
        "covid-cxr same finding P@5": _table(finding, "finding", {k: v[known] for k, v in vectors.items()}),
    }
    views = covid["view_key"].isin(["PA", "AP"]).to_numpy()
    view = covid[views].copy()
    view.attrs = covid.attrs
    out["covid-cxr same view P@5"] = _table(view, "view_key", {k: v[views] for k, v in vectors.items()})
    tb = import_source("yolo", data / "tbx11k-tb")
    tb.attrs["root"] = str(data / "tbx11k-tb")
    tb["side"] = [_side(b) for b in tb["boxes"]]
    tb = tb[tb["side"] != "none"].copy()
    tb.attrs["root"] = str(data / "tbx11k-tb")
    tb_paths = _paths(tb)
    out["tbx11k same lesion side P@5"] = _table(tb, "side", {
        "cxr-small untrained projector": untrained.encode_images(tb_paths),
        "frozen tower features (no projector)": _frozen_features(untrained, tb_paths),
        "cxr-base untrained projector": base_untrained.encode_images(tb_paths),
        "cxr-base frozen tower features (no projector)": _frozen_features(base_untrained, tb_paths),
    })  # fmt: skip
    return out


def table_rows(table: dict[str, Any]) -> list[dict[str, Any]]:
    """One markdown row per system of a `_table`: its P@K with the interval, and whether that lies above random's."""
    from retrieval.bootstrap import Estimate

    return [{"system": system, f"P@{K} [95% CI]": Estimate(rec["value"], rec["low"], rec["high"], rec["n"]).text(3),
             "interval above random's": "yes" if rec["above random"] else "no"}
            for system, rec in table["systems"].items()]  # fmt: skip


def real_markdown(result: dict[str, Any]) -> str:
    lines = ["# Retrieval quality on real images (../shared/data)", ""]
    for name, table in result.items():
        if not isinstance(table, dict) or "systems" not in table:
            continue
        lines += [f"## {name}", ""]
        lines.append(markdown_table(table_rows(table)))
        lines += ["", f"{table['test queries']} test queries; keys of the test queries: {table['keys (test)']}; "
                  f"of all rows: {table['keys (all)']}. Shuffled answers: {table['shuffled from']}'s.", ""]  # fmt: skip
    lines += [
        "Test images (the importers' patient-disjoint test split) query the train+val images; the query's own "
        "patient is never counted. Intervals: 95% percentile bootstrap over the test queries (retrieval/bootstrap.py). "
        "TBX11K has no reports, so no model is trained on it here. Only the offline towers run here (cxr-small: "
        "Lite0 at 224 px; cxr-base: Lite2 at 260 px): "
        "timm:/hf: towers (RAD-DINO, MedSigLIP, DINOv2) need their weights from the hub (README, towers by name).",
        "",
    ]
    return "\n".join(lines)
