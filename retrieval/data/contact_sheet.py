"""A contact sheet of a manifest: a grid of studies, each with its report's first sentence and finding boxes."""

from __future__ import annotations

import re
import textwrap
from pathlib import Path

import pandas as pd

from retrieval.study_text import first_sentence


def _caption(text: str, width: int = 48, lines: int = 2) -> str:
    """The report's first sentence, de-identification tokens dropped, wrapped to `lines` lines of `width`."""
    text = re.sub(r"\s+", " ", re.sub(r"\bX+\b", "", str(text or ""))).strip()
    sentence = first_sentence(text) or "(no report text)"
    wrapped = textwrap.wrap(sentence, width) or [""]
    if len(wrapped) > lines:
        wrapped = wrapped[:lines]
        wrapped[-1] = wrapped[-1][: width - 1] + "…"
    return "\n".join(wrapped)


def _finding_names(boxes: list[dict]) -> set[str]:
    return {b["label"] for b in boxes if not b["label"].startswith("anatomy:")}


def _pick(df: pd.DataFrame, n: int) -> list:
    """Row labels of `n` studies to show: abnormal studies that each add a finding not shown yet (so the sheet
    covers many kinds), then more abnormal ones, then about a quarter normal studies, in manifest order."""
    from retrieval.labels import is_abnormal

    abnormal = [i for i, labels in zip(df.index, df["labels"], strict=True) if is_abnormal(list(labels))]
    normal = [i for i in df.index if i not in set(abnormal)]
    k_normal = min(len(normal), max(1, n // 4))
    picked, seen = [], set()
    for i in abnormal:
        names = _finding_names(df.at[i, "boxes"])
        if names - seen and len(picked) < n - k_normal:
            picked.append(i)
            seen |= names
    for i in abnormal:
        if len(picked) >= n - k_normal:
            break
        if i not in picked and _finding_names(df.at[i, "boxes"]):
            picked.append(i)
    picked += normal[: n - len(picked)]
    return picked


def contact_sheet(
    manifest: pd.DataFrame | str | Path,
    out_png: str | Path,
    n: int = 16,
    ids: list[str] | None = None,
    show_anatomy: bool = False,
) -> Path:
    """Save a grid of `n` studies (or those in `ids`) with the first report sentence and the finding boxes drawn.

    Abnormal studies that add a finding kind not shown yet come first, then normal ones; anatomy boxes
    (labels starting with 'anatomy:') are drawn only with `show_anatomy`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.patches as patches
    import matplotlib.pyplot as plt

    from retrieval.data.image_io import read_image
    from retrieval.data.manifest import read_manifest, resolve_image_path
    df = read_manifest(manifest) if not isinstance(manifest, pd.DataFrame) else manifest
    root = df.attrs.get("root")
    if ids is not None:
        rows = df[df["image_id"].isin(ids)]
    else:
        rows = df.loc[_pick(df, n)]
    cols = 4
    nrows = max(1, -(-len(rows) // cols))
    fig, axes = plt.subplots(nrows, cols, figsize=(cols * 3.6, nrows * 4.0))
    for ax in axes.flat:
        ax.axis("off")
    for ax, (_, row) in zip(axes.flat, rows.iterrows(), strict=False):
        img = read_image(resolve_image_path(root, row["image_path"]))
        h, w = img.shape
        ax.imshow(img, cmap="gray", vmin=0, vmax=1)
        for b in row["boxes"]:
            anatomy = b["label"].startswith("anatomy:")
            if anatomy and not show_anatomy:
                continue
            color = "deepskyblue" if anatomy else "red"
            x1, y1, x2, y2 = b["x1"] * w, b["y1"] * h, b["x2"] * w, b["y2"] * h
            ax.add_patch(patches.Rectangle((x1, y1), x2 - x1, y2 - y1, fill=False, ec=color, lw=1.0))
            ax.text(
                x1 + 1,
                y1 - 2,
                b["label"].removeprefix("anatomy:"),
                color="yellow",
                fontsize=5.5,
                va="bottom",
                bbox={"facecolor": "black", "alpha": 0.5, "pad": 0.5, "lw": 0},
            )
        labels = ", ".join(row["labels"])
        ax.set_title(
            f"{row['study_id']}: {_caption(row['report'])}\n[{labels}]", fontsize=6.5, loc="left"
        )
    fig.suptitle(
        "cxr-retrieval demo corpus: synthetic radiographs rendered from real IU X-ray reports "
        "(red: finding boxes)",
        fontsize=9,
    )
    fig.tight_layout(rect=(0, 0, 1, 0.975))
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, dpi=110)
    plt.close(fig)
    return out_png
