"""A CSV (or Parquet) already in, or close to, the manifest schema; `column_map` renames the user's columns.

Missing ids are derived: image_id from the image file name, study_id from image_id, patient_id from study_id.
Without a `labels` column the rule labeler reads them from the report text. Relative image paths are taken
relative to the CSV's folder. Rows without an image_id or image_path are skipped and reported.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pandas as pd

from retrieval.data.importers.common import finish, normalize_view
from retrieval.data.manifest import COLUMNS, normalize_manifest
from retrieval.errors import ImportError_


def parse_column_map(text: str | Mapping[str, str] | None) -> dict[str, str]:
    """'image_id=dicom,report=text' (manifest column = source column) or a dict -> {source: manifest}."""
    if not text:
        return {}
    pairs = text.items() if isinstance(text, Mapping) else (p.split("=", 1) for p in str(text).split(",") if p)
    out: dict[str, str] = {}
    for pair in pairs:
        if len(pair) != 2 or not pair[0].strip() or not pair[1].strip():
            raise ImportError_(f"bad column map entry {'='.join(pair)!r}: expected manifest_column=source_column")
        target, source = pair[0].strip(), pair[1].strip()
        if target not in COLUMNS:
            raise ImportError_(f"column map: {target!r} is not a manifest column ({', '.join(COLUMNS)})")
        out[source] = target
    return out


def import_csv(
    src: str | Path,
    column_map: str | Mapping[str, str] | None = None,
    images: str | Path | None = None,
    seed: int = 0,
    **_: Any,
) -> pd.DataFrame:
    """A manifest from a manifest-like CSV/Parquet file; image paths resolve against `images` (default: the
    file's folder)."""
    from retrieval.labels import label_report

    src = Path(src)
    if not src.is_file():
        raise ImportError_(f"{src}: file not found")
    try:
        if src.suffix.lower() == ".parquet":
            df = pd.read_parquet(src)
        else:
            df = pd.read_csv(src, dtype=str, keep_default_na=False, sep=None, engine="python")
    except Exception as e:
        raise ImportError_(f"{src}: cannot read: {type(e).__name__}: {e}") from None
    mapping = parse_column_map(column_map)
    absent = [s for s in mapping if s not in df.columns]
    if absent:
        raise ImportError_(f"{src}: column map names column(s) not in the file: {', '.join(absent)}")
    df = df.rename(columns=mapping)
    if "image_path" not in df.columns:
        raise ImportError_(f"{src}: no image_path column (map one with --column-map image_path=COLUMN)")
    had_labels = "labels" in df.columns
    for col in ("image_id", "study_id", "patient_id"):
        if col not in df.columns:
            df[col] = ""
    df = normalize_manifest(df)
    problems = [f"{src.name} row {p.row}: {p.column}: {p.message}" for p in df.attrs.get("manifest_parse_problems", [])]
    base = Path(images) if images else src.parent
    rows = []
    for i, rec in enumerate(df.to_dict("records")):
        path = rec["image_path"]
        if not path:
            problems.append(f"{src.name} row {i}: empty image_path, skipped")
            continue
        p = Path(path).expanduser()
        rec["image_path"] = str((p if p.is_absolute() else base / p).resolve())
        rec["image_id"] = rec["image_id"] or Path(path).with_suffix("").as_posix()
        rec["study_id"] = rec["study_id"] or rec["image_id"]
        rec["patient_id"] = rec["patient_id"] or rec["study_id"]
        rec["view"] = normalize_view(rec["view"])
        if not rec["report"] and (rec["findings"] or rec["impression"]):
            rec["report"] = " ".join(x for x in (rec["findings"], rec["impression"]) if x)
        if not had_labels and rec["report"]:
            rec["labels"] = label_report(rec["report"])
        rows.append(rec)
    notes = [] if had_labels else ["no labels column: labels read from the report text by the rule labeler"]
    return finish(rows, "csv", seed=seed, problems=problems, notes=notes)
