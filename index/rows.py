"""Manifest rows -> the rows an index stores: the shared manifest check, normalised absolute image paths, the
indexed report text, and the digest that recognises the same rows again (resume, already-done)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pandas as pd

from retrieval.errors import ManifestError
from retrieval.study_text import report_text


def prepare(
    manifest: pd.DataFrame | str | Path, allow_outside: bool = False, skip_bad_rows: bool = False
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The manifest as the rows an index stores (meta columns, normalised absolute image paths, report text),
    after the shared validator; and the refused rows (row, image_id, path, reason), with `skip_bad_rows`.

    rows.attrs["positions"] holds each kept row's position in the manifest."""
    from retrieval.data import dataset_roots
    from retrieval.data.manifest import (
        DICOM_COLUMNS,
        normalize_manifest,
        read_manifest,
        resolve_image_path,
        text_column,
    )
    from retrieval.data.manifest_check import check_manifest
    from retrieval.text_limits import truncate_reports

    if isinstance(manifest, str | Path):
        df = read_manifest(manifest)
    else:
        attrs = dict(manifest.attrs)
        df = normalize_manifest(manifest)
        df.attrs.update({k: v for k, v in attrs.items() if k in ("root", "path", dataset_roots.ATTR)})
    missing = [c for c in ("image_id", "study_id", "patient_id", "image_path") if c not in df.columns]
    if missing:
        raise ManifestError(f"{df.attrs.get('path', 'manifest')}: missing column(s) {', '.join(missing)}")
    if len(df) == 0:
        raise ManifestError(f"{df.attrs.get('path') or df.attrs.get('root') or 'manifest'}: the manifest has no rows")
    checked = check_manifest(df, allow_outside=allow_outside, skip_bad_rows=skip_bad_rows)
    df = checked.rows
    if len(df) == 0:
        raise ManifestError(f"{df.attrs.get('path', 'manifest')}: every row was refused; see the reasons above")
    root, also_inside = df.attrs.get("root"), dataset_roots.recorded_roots(df)
    rows = pd.DataFrame(
        {
            "image_id": df["image_id"].astype(str),
            "study_id": df["study_id"].astype(str),
            "patient_id": df["patient_id"].astype(str),
            "image_path": [
                str(resolve_image_path(root, p, allow_outside, also_inside)) if str(p).strip() else ""
                for p in df["image_path"]
            ],
            "view": df["view"].astype(str),
            "report": truncate_reports([report_text(r) for r in df.to_dict("records")], df["image_id"]),
            "labels": [list(x) for x in df["labels"]],
            "split": df["split"].astype(str),
            "source": df["source"].astype(str),
        }
    )
    rows["has_report"] = rows["report"].str.len() > 0
    for col in DICOM_COLUMNS:  # the archive's UIDs of DICOM rows; '' for rows from other sources
        rows[col] = text_column(df[col]).to_numpy() if col in df.columns else ""
    rows = rows.reset_index(drop=True)
    rows.attrs["positions"] = checked.positions
    return rows, checked.refused


def prepare_rows(manifest: pd.DataFrame | str | Path, allow_outside: bool = True) -> pd.DataFrame:
    """The rows an index stores (see `prepare`); a manifest with unusable rows is a ManifestError."""
    return prepare(manifest, allow_outside=allow_outside)[0]


def manifest_digest(rows: pd.DataFrame) -> str:
    """A digest of every stored column of the rows: a resumed build must see the same manifest, and a rerun
    after the commit is recognised as done only for the very same rows."""
    h = hashlib.sha256()
    for col in ("image_id", "study_id", "patient_id", "image_path", "view", "report", "split", "source"):
        h.update("\x1f".join(rows[col].astype(str)).encode())
        h.update(b"\x1e")
    h.update(json.dumps([list(v) for v in rows["labels"]]).encode())
    from retrieval.data.manifest import DICOM_COLUMNS

    dicom = [c for c in DICOM_COLUMNS if c in rows.columns and rows[c].astype(str).str.len().any()]
    for col in dicom:  # only when filled: the digest of a manifest without them stays what it was
        h.update(col.encode() + b"\x1f" + "\x1f".join(rows[col].astype(str)).encode() + b"\x1e")
    return h.hexdigest()[:16]
