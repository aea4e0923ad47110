"""Helpers every importer shares: label-name mapping, view names, image lookup, and the final manifest step.

An importer returns a manifest DataFrame; the rows it had to skip (and why) travel in
``df.attrs["import_problems"]`` (list of str) and plain facts worth telling the user (no images found,
unmapped class names) in ``df.attrs["import_notes"]``. Bad rows never abort an import.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from retrieval.data import dataset_roots
from retrieval.data.manifest import COLUMNS, SPLIT_ALIASES, SPLITS, assign_splits, normalize_manifest
from retrieval.errors import ImportError_

IMAGE_SUFFIXES: tuple[str, ...] = (".png", ".jpg", ".jpeg", ".dcm", ".dicom", ".bmp", ".tif", ".tiff")
PROBLEMS = "import_problems"
NOTES = "import_notes"

# Class / finding names (lower case) that mean a vocabulary label. Exact vocabulary names match on their own.
_SYNONYMS: dict[str, str] = {
    "normal": "No Finding",
    "no finding": "No Finding",
    "no findings": "No Finding",
    "tb": "Tuberculosis",
    "active tuberculosis": "Tuberculosis",
    "obsolete pulmonary tb": "Tuberculosis",
    "latent tuberculosis": "Tuberculosis",
    "pulmonary tuberculosis": "Tuberculosis",
    "effusion": "Pleural Effusion",
    "pleural effusion": "Pleural Effusion",
    "pleural thickening": "Pleural Other",
    "nodule": "Lung Lesion",
    "mass": "Lung Lesion",
    "nodule/mass": "Lung Lesion",
    "opacity": "Lung Opacity",
    "infiltration": "Lung Opacity",
    "infiltrate": "Lung Opacity",
    "aortic enlargement": "Enlarged Cardiomediastinum",
    "pulmonary edema": "Edema",
    "ards": "Edema",  # acute respiratory distress syndrome: non-cardiogenic pulmonary oedema
}
# Organisms and pneumonia kinds of the ieee8023 'finding' hierarchy (Pneumonia/Viral/COVID-19 ...).
_PNEUMONIA_WORDS = {
    "pneumonia", "viral", "bacterial", "fungal", "lipoid", "aspiration", "covid-19", "covid19", "covid",
    "sars", "mers", "mers-cov", "influenza", "h1n1", "varicella", "herpes", "streptococcus", "staphylococcus",
    "e.coli", "e. coli", "klebsiella", "legionella", "chlamydophila", "mycoplasma", "mycoplasma pneumoniae",
    "pneumocystis", "aspergillosis", "nocardia", "pseudomonas", "haemophilus", "moraxella", "candida",
}  # fmt: skip


def vocabulary() -> list[str]:
    """The label vocabulary (retrieval.labels.LABELS), imported lazily."""
    from retrieval.labels import LABELS

    return list(LABELS)


def map_label(name: str) -> str | None:
    """A dataset's class or finding name as a vocabulary label, or None when it names none (e.g. anatomy).

    Exact vocabulary names (any case) match; then a small synonym table (TBX11K's TB classes -> Tuberculosis,
    VinDr-style names, 'normal' -> No Finding); then any name containing 'tuberculosis' or 'pneumonia'."""
    text = " ".join(str(name).strip().lower().replace("_", " ").split())
    if not text:
        return None
    for label in vocabulary():
        if text == label.lower():
            return label
    if text in _SYNONYMS:
        return _SYNONYMS[text]
    if "tuberculosis" in text:
        return "Tuberculosis"
    if "pneumonia" in text or text in _PNEUMONIA_WORDS:
        return "Pneumonia"
    return None


def map_finding(finding: str) -> list[str]:
    """An ieee8023 'finding' ('Pneumonia/Viral/COVID-19', 'COVID-19, ARDS', 'Tuberculosis', 'No Finding') as
    vocabulary labels: each '/'- or ','-separated part is mapped; unknown ones ('todo', 'Unknown') dropped."""
    found: list[str] = []
    whole = map_label(finding)
    parts = [whole] if whole else [map_label(p) for p in re.split(r"[/,;]", str(finding))]
    for label in parts:
        if label and label not in found:
            found.append(label)
    if "No Finding" in found and len(found) > 1:
        found.remove("No Finding")
    order = {label: i for i, label in enumerate(vocabulary())}
    return sorted(found, key=lambda x: order.get(x, len(order)))


def normalize_view(view: Any) -> str:
    """A view position in one spelling: PA, AP, AP SUPINE, LATERAL (L, LL, RL ...), else upper case."""
    text = " ".join(str(view or "").strip().upper().replace("_", " ").split())
    if text in ("", "NAN", "NONE"):
        return ""
    if text in ("L", "LL", "RL", "LAT", "LATERAL", "LARGE LATERAL", "LEFT LATERAL", "RIGHT LATERAL"):
        return "LATERAL"
    return text


def normalize_split(split: Any) -> str:
    """A source's split name as train/val/test ('validate' -> 'val'); '' when it is none of them."""
    text = str(split or "").strip().lower()
    text = SPLIT_ALIASES.get(text, text)
    return text if text in SPLITS else ""


def read_csv_text(path: Path) -> pd.DataFrame:
    """A dataset's CSV with every cell as text ('' for empty cells); ImportError_ naming the file when unreadable."""
    try:
        return pd.read_csv(path, dtype=str, keep_default_na=False)
    except Exception as e:  # pandas raises many types for a bad file
        raise ImportError_(f"{path}: cannot read CSV: {type(e).__name__}: {e}") from None


def index_images(folder: str | Path, suffixes: Sequence[str] = IMAGE_SUFFIXES) -> dict[str, Path]:
    """Every image file under `folder` (recursive), by file name and by stem (first one wins)."""
    found: dict[str, Path] = {}
    folder = Path(folder)
    if not folder.is_dir():
        return found
    for dirpath, _dirs, files in os.walk(folder):
        for name in sorted(files):
            if Path(name).suffix.lower() in suffixes:
                path = Path(dirpath) / name
                found.setdefault(name, path)
                found.setdefault(Path(name).stem, path)
    return found


def box_from_xywh(
    label: str, x: float, y: float, w: float, h: float, width: float, height: float
) -> dict[str, Any] | None:
    """A pixel box (COCO x, y, w, h) as a normalised {label, x1, y1, x2, y2}, clipped to the image;
    None when it is empty after clipping or the image size is unknown."""
    if not width or not height or width <= 0 or height <= 0:
        return None
    return clip_box(label, x / width, y / height, (x + w) / width, (y + h) / height)


def clip_box(label: str, x1: float, y1: float, x2: float, y2: float) -> dict[str, Any] | None:
    """A normalised box clipped to [0, 1] (rounding at the edges is common), None when degenerate."""
    x1, y1, x2, y2 = (min(max(float(v), 0.0), 1.0) for v in (x1, y1, x2, y2))
    if x2 <= x1 or y2 <= y1:
        return None
    return {"label": str(label), "x1": x1, "y1": y1, "x2": x2, "y2": y2}


def finish(
    rows: Iterable[Mapping[str, Any]],
    source: str,
    seed: int = 0,
    problems: Sequence[str] = (),
    notes: Sequence[str] = (),
    fractions: Mapping[str, float] | None = None,
) -> pd.DataFrame:
    """Rows -> a normalised manifest: `source` filled, splits assigned by patient (seeded) for rows without
    one, duplicate image_ids dropped (reported), problems and notes kept in ``df.attrs``."""
    problems = list(problems)
    df = pd.DataFrame(list(rows))
    for col in COLUMNS:
        if col not in df.columns:
            df[col] = [[] for _ in range(len(df))] if col in ("labels", "boxes") else ""
    df = normalize_manifest(df)
    if len(df):
        df["source"] = [s or source for s in df["source"]]
        dup = df["image_id"].duplicated(keep="first")
        for image_id in df.loc[dup, "image_id"]:
            problems.append(f"image_id {image_id!r}: duplicate image id, later row skipped")
        df = df.loc[~dup].reset_index(drop=True)
        df = _fill_splits(df, seed, fractions)
    df.attrs = {PROBLEMS: problems, NOTES: list(notes)}
    return df


def _fill_splits(df: pd.DataFrame, seed: int, fractions: Mapping[str, float] | None) -> pd.DataFrame:
    """Assign patient-disjoint splits where the source gave none; a patient with a split keeps it."""
    df = df.copy()
    df["split"] = [normalize_split(s) for s in df["split"]]
    missing = df["split"] == ""
    if not missing.any():
        return df
    known = df.loc[~missing].groupby("patient_id")["split"].first().to_dict()
    inherit = missing & df["patient_id"].isin(known)
    df.loc[inherit, "split"] = df.loc[inherit, "patient_id"].map(known)
    rest = df["split"] == ""
    if rest.any():
        df.loc[rest, "split"] = assign_splits(df.loc[rest], fractions, seed)["split"].to_numpy()
    return df


def relativize_paths(df: pd.DataFrame, root: str | Path) -> pd.DataFrame:
    """A copy with image paths under `root` (the manifest's folder) made relative, the others absolute; of the
    dataset roots in ``df.attrs``, those that hold an absolute path are kept."""
    root = Path(root).resolve()
    out = df.copy()
    paths, outside = [], []
    for p in out["image_path"]:
        if not p:
            paths.append("")
            continue
        path = Path(p).resolve()
        try:
            paths.append(path.relative_to(root).as_posix())
        except ValueError:
            paths.append(str(path))
            outside.append(str(path))
    out["image_path"] = pd.Series(paths, index=out.index, dtype=object)
    out.attrs[dataset_roots.ATTR] = dataset_roots.holding(dataset_roots.recorded_roots(df), outside)
    return out
