"""What bounds TBX11K's same-lesion-side P@5? The ablation: pooling that keeps the side, and a vector fitted on the
side labels, against the global-pooled tower features that retrieval uses today.

    python -m benchmarks.side_probe_real [--data ../shared/data]

The images' frozen grid tokens (cxr-small: Lite0, 7x7 at 224 px; cxr-base: Lite2, 9x9 at 260 px) are pooled two
ways: over the whole grid (the tower's pooled feature, what `cxr index build` embeds) and per image half (the mean
of the left columns and of the right columns, concatenated; the middle column of an odd grid is left out). Each
pooling is scored as it is (cosine) and through a linear probe fitted on the training images' side labels
(standardise, PCA 64, multinomial logistic regression; its class probabilities are the vector). The probe's C is
chosen on the validation split (val images query the training images), then the test split is scored as in
quality_real.py: each test image queries the train+val images, its own patient never counted, with random
ranking, the image-free prior and shuffled answers in the same run, and 95% bootstrap intervals.
Results: benchmarks/results/side_probe_tbx11k.{json,md}.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from benchmarks.common import markdown_table, write_results
from benchmarks.quality_real import K, _paths, _side, _table, table_rows, top_keys, unit_rows

CS = (0.01, 0.1, 1.0)
TOWERS = ("cxr-small", "cxr-base")
COMMAND = "python -m benchmarks.side_probe_real"


def pooled(tokens: np.ndarray) -> dict[str, np.ndarray]:
    """(N, g*g, D) grid tokens -> {"global": (N, D), "halves": (N, 2D)} (left columns' mean, right columns')."""
    n, t, d = tokens.shape
    g = int(round(t**0.5))
    grid = tokens.reshape(n, g, g, d)
    h = g // 2
    return {"global": grid.mean((1, 2)), "halves": np.concatenate([grid[:, :, :h].mean((1, 2)),
                                                                   grid[:, :, g - h:].mean((1, 2))], 1)}  # fmt: skip


def probe(features: np.ndarray, df: pd.DataFrame, key: str) -> tuple[np.ndarray, float, dict[float, float]]:
    """The probe's class probabilities for every row, fitted on train with C chosen by validation P@K."""
    from sklearn.decomposition import PCA
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    train = (df["split"] == "train").to_numpy()
    val = df[df["split"].isin(["train", "val"])].replace({"split": {"val": "test"}})  # val queries train
    keep = df["split"].isin(["train", "val"]).to_numpy()
    scores, fitted = {}, {}
    for c in CS:
        clf = make_pipeline(StandardScaler(), PCA(64, random_state=0), LogisticRegression(C=c, max_iter=5000))
        clf.fit(features[train], df[key].to_numpy()[train])
        fitted[c] = clf.predict_proba(features)
        qk, top = top_keys(unit_rows(fitted[c][keep]), val, key)
        scores[c] = round(float(np.mean(top == qk[:, None])), 3)
    best = max(CS, key=lambda c: scores[c])
    return fitted[best], best, scores


def run(data: Path) -> dict[str, Any]:
    from retrieval.data.importers import import_source
    from retrieval.models import load_model
    from retrieval.models.image_stream import encode_image_items

    tb = import_source("yolo", data / "tbx11k-tb")
    tb["side"] = [_side(b) for b in tb["boxes"]]
    tb = tb[tb["side"] != "none"].reset_index(drop=True)
    tb.attrs["root"] = str(data / "tbx11k-tb")
    systems, chosen = {}, {}
    for tower in TOWERS:
        tokens, _, _ = encode_image_items(load_model(tower), _paths(tb), output="tokens", on_error="raise")
        for pool, feats in pooled(np.asarray(tokens, dtype=np.float32)).items():
            systems[f"{tower}, {pool} pool, frozen features"] = unit_rows(feats)
            vectors, c, val_scores = probe(feats, tb, "side")
            name = f"{tower}, {pool} pool, linear probe on the side labels"
            systems[name] = unit_rows(vectors)
            chosen[name] = {"C": c, f"val P@{K} by C": val_scores}
    table = _table(tb, "side", systems)
    return {"tbx11k same lesion side P@5": table, "probe choice (validation)": chosen}


def markdown(result: dict[str, Any]) -> str:
    table, chosen = result["tbx11k same lesion side P@5"], result["probe choice (validation)"]
    rows = [row | {"C (chosen on val)": chosen[row["system"]]["C"] if row["system"] in chosen else ""}
            for row in table_rows(table)]  # fmt: skip
    return "\n".join([
        "# TBX11K same lesion side P@5: what the pooling and the side labels add", "",
        markdown_table(rows), "",
        f"{table['test queries']} test queries; keys of the test queries: {table['keys (test)']}; of all rows: "
        f"{table['keys (all)']}. Shuffled answers: {table['shuffled from']}'s. Validation P@{K} by C: "
        + "; ".join(f"{k}: {v[f'val P@{K} by C']}" for k, v in chosen.items()), "",
    ])  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=Path(__file__).resolve().parents[2] / "shared" / "data")
    args = ap.parse_args()
    result = run(args.data)
    write_results("side_probe_tbx11k", result, markdown(result), COMMAND)


if __name__ == "__main__":
    main()
