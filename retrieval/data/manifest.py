"""The study manifest: one row per image, the table every other part of the project reads.

Columns (DESIGN.md section 4): image_id, study_id, patient_id, image_path, view, report, findings, impression,
labels (list of str), boxes (list of {label, x1, y1, x2, y2} normalised to [0, 1]), split, source.
Extra columns are kept. In memory `labels` is a list of str and `boxes` a list of dicts; Parquet stores
`labels` as list<string> and `boxes` as a JSON string; CSV stores `labels` as JSON or '|'-separated and
`boxes` as JSON.
Image paths are relative to the manifest's folder (``df.attrs["root"]``) or absolute. A Parquet manifest also
records the dataset folders its importer read (`dataset_roots`: ``df.attrs["dataset_roots"]``).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from retrieval.data import dataset_roots
from retrieval.errors import ManifestError
from retrieval.fileio import atomic_path

COLUMNS: tuple[str, ...] = (
    "image_id",
    "study_id",
    "patient_id",
    "image_path",
    "view",
    "report",
    "findings",
    "impression",
    "labels",
    "boxes",
    "split",
    "source",
)
# Optional columns of rows imported from DICOM (the importers `dicom` and `dicomweb` fill them, others leave them
# empty): the UIDs and tags an archive's viewer opens a study by. The index keeps them in its meta rows and every
# query result carries them ('' where unknown).
DICOM_COLUMNS: tuple[str, ...] = (
    "study_instance_uid",
    "series_instance_uid",
    "sop_instance_uid",
    "accession_number",
    "study_date",
    "modality",
)
# Columns a manifest must carry; the others are filled with empty values when absent.
REQUIRED: tuple[str, ...] = ("image_id", "study_id", "patient_id", "image_path")
TEXT_COLUMNS: tuple[str, ...] = tuple(c for c in COLUMNS if c not in ("labels", "boxes"))
SPLITS: tuple[str, ...] = ("train", "val", "test")
DEFAULT_FRACTIONS: dict[str, float] = {"train": 0.8, "val": 0.1, "test": 0.1}
# Other spellings of the split names (MIMIC-CXR writes "validate").
SPLIT_ALIASES: dict[str, str] = {
    "training": "train",
    "valid": "val",
    "validate": "val",
    "validation": "val",
    "dev": "val",
    "testing": "test",
}
BOX_KEYS: tuple[str, ...] = ("x1", "y1", "x2", "y2")
COMMA_JOINED = "looks like several labels joined by a comma; separate them with '|' or write a JSON list"
PARSE_PROBLEMS_ATTR = "manifest_parse_problems"


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a manifest: the row (0-based position, None for the whole table), its image_id,
    the column and the reason."""

    row: int | None
    column: str
    message: str
    image_id: str = ""

    def __str__(self) -> str:
        where = "manifest" if self.row is None else f"row {self.row}"
        if self.image_id:
            where += f" (image_id {self.image_id!r})"
        return f"{where}: {self.column}: {self.message}"

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (for `--json` output)."""
        return {"row": self.row, "image_id": self.image_id, "column": self.column, "message": self.message}


# ------------------------------------------------------------------------------------------ cell parsing


def _is_missing(value: Any) -> bool:
    if value is None:
        return True
    if isinstance(value, float) and math.isnan(value):
        return True
    return value is pd.NA or value is pd.NaT


def parse_labels(value: Any) -> list[str]:
    """A labels cell as a list of str: a list/array, a JSON list, '|'-separated text, or empty.

    Raises ValueError for a cell that looks like JSON but is not a list of strings."""
    if _is_missing(value):
        return []
    if isinstance(value, np.ndarray):
        value = value.tolist()
    if isinstance(value, (list, tuple)):
        if all(type(v) is str and v and v == v.strip() for v in value):  # the common, clean case
            return list(value)
        return [str(v).strip() for v in value if not _is_missing(v) and str(v).strip()]
    text = str(value).strip()
    if not text:
        return []
    if text.startswith("["):
        try:
            parsed = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"not valid JSON ({e.msg})") from None
        if not isinstance(parsed, list):
            raise ValueError("JSON value is not a list")
        return [str(v).strip() for v in parsed if v is not None and str(v).strip()]
    return [part.strip() for part in text.split("|") if part.strip()]


def parse_boxes(value: Any) -> list[dict[str, Any]]:
    """A boxes cell as a list of dicts: a list, a JSON string, or empty. Raises ValueError when malformed.

    Coordinates are converted to float; range checks are left to `validate_manifest`."""
    if _is_missing(value):
        return []
    if isinstance(value, np.ndarray):
        value = value.tolist()
    if isinstance(value, str):
        text = value.strip()
        if not text or text == "[]":
            return []
        try:
            value = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"not valid JSON ({e.msg})") from None
    if not isinstance(value, (list, tuple)):
        raise ValueError("not a list of boxes")
    boxes = []
    for i, box in enumerate(value):
        if not isinstance(box, Mapping):
            raise ValueError(f"box {i} is not an object")
        missing = [k for k in ("label", *BOX_KEYS) if k not in box]
        if missing:
            raise ValueError(f"box {i} lacks {', '.join(missing)}")
        out = dict(box)
        out["label"] = "" if _is_missing(box["label"]) else str(box["label"])
        for k in BOX_KEYS:
            try:
                out[k] = float(box[k])
            except (TypeError, ValueError):
                raise ValueError(f"box {i}: {k}={box[k]!r} is not a number") from None
        boxes.append(out)
    return boxes


def _text(value: Any) -> str:
    if _is_missing(value):
        return ""
    return str(value).strip()


# ------------------------------------------------------------------------------------------ table level


def text_column(values: pd.Series) -> pd.Series:
    """A column as stripped str cells with '' for missing values, object dtype (vectorised `_text`)."""
    if isinstance(values.dtype, pd.StringDtype):  # Arrow-backed text (pandas >= 3): stay vectorised
        return pd.Series(values.fillna("").str.strip().to_numpy(dtype=object), index=values.index, dtype=object)
    obj = values.astype(object)
    obj = obj.where(obj.notna(), "")
    return pd.Series(obj.astype(str).str.strip().to_numpy(dtype=object), index=values.index, dtype=object)


def path_column(values: pd.Series) -> pd.Series:
    """image_path cells as str, NOT stripped (a space may belong to the file's name); blank cells become ''."""
    obj = values.astype(object)
    obj = obj.where(obj.notna(), "")
    cells = [str(v) for v in obj]
    return pd.Series([c if c.strip() else "" for c in cells], index=values.index, dtype=object)


def normalize_manifest(df: pd.DataFrame) -> pd.DataFrame:
    """A copy of `df` in the in-memory form: optional columns added (empty), text columns as str, `labels` and
    `boxes` as lists, split aliases mapped ("validate" -> "val"), schema columns first, extra columns kept.

    Required columns that are absent stay absent (`validate_manifest` reports them). Cells that cannot be
    parsed become empty lists and are recorded in ``df.attrs`` so that `validate_manifest` reports them."""
    out = df.reset_index(drop=True)
    problems: list[Problem] = list(df.attrs.get(PARSE_PROBLEMS_ATTR, []))
    for col in COLUMNS:
        if col not in out.columns and col not in REQUIRED:
            out[col] = [[] for _ in range(len(out))] if col in ("labels", "boxes") else ""
    for col in (*TEXT_COLUMNS, *DICOM_COLUMNS):
        if col in out.columns:
            out[col] = path_column(out[col]) if col == "image_path" else text_column(out[col])
    ids = out["image_id"].tolist() if "image_id" in out.columns else [""] * len(out)
    if "split" in out.columns:
        out["split"] = pd.Series([SPLIT_ALIASES.get(s.lower(), s.lower()) for s in out["split"]], dtype=object)
    for col, parse in (("labels", parse_labels), ("boxes", parse_boxes)):
        values = []
        for i, v in enumerate(out[col]):
            try:
                values.append(parse(v))
            except ValueError as e:
                problems.append(Problem(i, col, f"cannot parse {str(v)[:60]!r}: {e}", ids[i]))
                values.append([])
        out[col] = pd.Series(values, index=out.index, dtype=object)
    for col in out.columns:  # extra list columns (e.g. `mesh`) come back from Parquet as numpy arrays
        if col not in COLUMNS and out[col].dtype == object:
            if any(isinstance(v, np.ndarray) for v in out[col]):
                out[col] = pd.Series(
                    [v.tolist() if isinstance(v, np.ndarray) else v for v in out[col]],
                    index=out.index,
                    dtype=object,
                )
    order = [c for c in COLUMNS if c in out.columns] + [c for c in out.columns if c not in COLUMNS]
    out = out[order]
    out.attrs = dict(df.attrs)
    out.attrs[PARSE_PROBLEMS_ATTR] = problems
    return out


def read_manifest(path: str | Path) -> pd.DataFrame:
    """Read a manifest (.parquet, or .csv/.tsv) into the in-memory form; ``df.attrs["root"]`` is its folder.

    Raises ManifestError when the file is missing or unreadable; bad rows are left for `validate_manifest`."""
    path = Path(path)
    if not path.is_file():
        raise ManifestError(f"{path}: manifest not found")
    suffix = "".join(path.suffixes[-2:]).lower() if path.suffix.lower() == ".gz" else path.suffix.lower()
    try:
        if suffix == ".parquet":
            import pyarrow.parquet as pq

            df = pd.read_parquet(path)
            roots = dataset_roots.from_metadata(pq.read_schema(path).metadata, path)
        elif suffix in (".csv", ".csv.gz", ".tsv", ".tsv.gz"):
            sep = "\t" if suffix.startswith(".tsv") else ","
            df = pd.read_csv(path, sep=sep, dtype=str, keep_default_na=False)
            roots = []
        else:
            raise ManifestError(f"{path}: unknown manifest format {suffix!r} (use .parquet or .csv)")
    except ManifestError:
        raise
    except Exception as e:  # pyarrow / pandas raise many types for a corrupt file
        raise ManifestError(f"{path}: cannot read manifest: {type(e).__name__}: {e}") from None
    df = normalize_manifest(df)
    df.attrs["root"] = str(path.resolve().parent)
    df.attrs["path"] = str(path)
    df.attrs[dataset_roots.ATTR] = roots
    return df


def write_manifest(df: pd.DataFrame, path: str | Path) -> Path:
    """Write the manifest atomically as Parquet (or CSV when the name ends in .csv); returns the path.

    Parquet: `labels` as list<string>, `boxes` as a JSON string, the dataset roots of ``df.attrs`` in the file's
    metadata. CSV: `labels` and `boxes` as JSON (and no dataset root)."""
    path = Path(path)
    if path.suffix.lower() not in (".parquet", ".csv"):
        raise ManifestError(f"{path}: a manifest is written as .parquet or .csv, not {path.suffix or 'no suffix'!r}")
    out = normalize_manifest(df)
    metadata = dataset_roots.to_metadata(dataset_roots.recorded_roots(df))
    out.attrs = {}
    out["boxes"] = [json.dumps(b) for b in out["boxes"]]
    is_csv = path.suffix.lower() == ".csv"
    if is_csv:
        out["labels"] = [json.dumps(v) for v in out["labels"]]
    for col in out.columns:  # extra list columns (e.g. `mesh`) as JSON in CSV
        if is_csv and out[col].map(lambda v: isinstance(v, (list, dict, np.ndarray))).any():
            out[col] = [json.dumps(v.tolist() if isinstance(v, np.ndarray) else v) for v in out[col]]
    with atomic_path(path) as tmp:
        if is_csv:
            out.to_csv(tmp, index=False)
        else:
            import pyarrow as pa
            import pyarrow.parquet as pq

            table = pa.Table.from_pandas(out, preserve_index=False)
            fields = [pa.field("labels", pa.list_(pa.string())) if f.name == "labels" else f for f in table.schema]
            table = table.cast(pa.schema(fields, metadata={**(table.schema.metadata or {}), **metadata}))
            pq.write_table(table, tmp)
    return path


def resolve_image_path(
    root: str | Path | None,
    image_path: str | Path,
    allow_outside: bool = True,
    also_inside: Sequence[str | Path] = (),
) -> Path:
    """The file an `image_path` cell names: absolute as is, else relative to the manifest folder `root`;
    lexically normalised (`a/../b` -> `b`; the path returned keeps its symlinks).

    Spaces around the cell are kept when a file of that exact name exists (they belong to its name) and dropped
    otherwise. With `allow_outside=False` a path that leaves `root` (`..`, or an absolute path elsewhere) is a
    ManifestError, unless it lies under one of the folders `also_inside` (the manifest's dataset roots); so is a
    path whose symlinks lead out of them (`is_inside` compares real paths)."""
    raw = "" if _is_missing(image_path) else str(image_path)
    text = raw.strip()
    if not text:
        raise ManifestError("image_path is empty (this row has no image file)")
    if "\x00" in text:  # no file system takes one (found by fuzzing: realpath raised ValueError)
        raise ManifestError(f"{short_text(text.replace(chr(0), '?'), 80)!r}: image_path holds a NUL byte")
    candidates = [raw, text] if raw != text else [text]
    paths = []
    for cell in candidates:
        p = Path(cell)
        try:
            p = p.expanduser()
        except RuntimeError:  # '~name' of a user that does not exist (found by fuzzing): the path as written
            pass
        if not p.is_absolute() and root is not None:
            p = Path(root) / p
        paths.append(Path(os.path.normpath(p)))
    path = next((p for p in paths if p.exists()), paths[-1])
    if not allow_outside and root is not None and not any(is_inside(r, path) for r in (root, *also_inside)):
        shown = short_text(text, 80)
        raise ManifestError(f"{shown!r} is outside the manifest folder (pass --allow-outside to read it)")
    return path


def short_text(text: str, limit: int = 160) -> str:
    """`text` cut to `limit` characters (for one-line messages)."""
    return text if len(text) <= limit else text[: limit - 1] + "…"


def is_inside(root: str | Path, path: str | Path) -> bool:
    """True when `path` is `root` or below it, compared on real paths (every symlink resolved): the one
    containment rule of every command that reads a manifest, so a link to `/etc/passwd` or to a folder elsewhere
    is outside."""
    r = os.path.realpath(root)
    p = os.path.realpath(path)
    return os.path.commonpath([r, p]) == r


# ------------------------------------------------------------------------------------------ splits, summary


def assign_splits(
    df: pd.DataFrame,
    fractions: Mapping[str, float] | None = None,
    seed: int = 0,
) -> pd.DataFrame:
    """A copy of `df` with `split` set by patient: every image of a patient lands in the same split.

    Deterministic for a given set of patients and seed: the sorted patient ids are shuffled with
    numpy's default_rng(seed) and cut at the cumulative `fractions` (default train 0.8, val 0.1, test 0.1).
    Rows without a patient_id are grouped by study_id, then by image_id."""
    fractions = dict(DEFAULT_FRACTIONS if fractions is None else fractions)
    unknown = [s for s in fractions if s not in SPLITS]
    if unknown or any(f < 0 for f in fractions.values()) or sum(fractions.values()) <= 0:
        raise ManifestError(f"bad split fractions {fractions} (names {SPLITS}, non-negative, positive sum)")
    out = df.copy()
    keys = {c: text_column(out[c]).tolist() if c in out.columns else [""] * len(out) for c in ("patient_id",
            "study_id", "image_id")}  # fmt: skip
    groups = [
        f"patient_id:{p}" if p else f"study_id:{st}" if st else f"image_id:{im}" if im else f"row:{i}"
        for i, (p, st, im) in enumerate(zip(keys["patient_id"], keys["study_id"], keys["image_id"], strict=True))
    ]
    patients = sorted(set(groups))
    order = np.random.default_rng(seed).permutation(len(patients))
    total = sum(fractions.values())
    names = list(fractions)
    cuts = np.round(np.cumsum([fractions[n] / total for n in names]) * len(patients)).astype(int)
    split_of: dict[str, str] = {}
    start = 0
    for name, end in zip(names, cuts, strict=True):
        for j in order[start:end]:
            split_of[patients[j]] = name
        start = end
    out["split"] = pd.Series([split_of[g] for g in groups], index=out.index, dtype=object)
    return out
