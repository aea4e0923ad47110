"""Checking a manifest: `validate_manifest` lists every problem (one `Problem` per bad cell), `blocks_use` tells
the ones that make a row unusable, and `check_manifest` / `gate_manifest` are the one gate build, add, train and
VLM training run (bad rows fail before any work, or are skipped and reported)."""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from retrieval.data import dataset_roots
from retrieval.data.manifest import (
    BOX_KEYS,
    COMMA_JOINED,
    PARSE_PROBLEMS_ATTR,
    REQUIRED,
    SPLITS,
    Problem,
    normalize_manifest,
    path_column,
    read_manifest,
    resolve_image_path,
    short_text,
    text_column,
)
from retrieval.errors import ManifestError


def _vocabulary() -> tuple[str, ...]:
    from retrieval.labels import LABELS  # imported lazily: labels.py is written alongside this module

    return tuple(LABELS)


def _box_problem(box: Mapping[str, Any]) -> str | None:
    if not str(box.get("label", "")).strip():
        return "box has an empty label"
    coords = [box[k] for k in BOX_KEYS]
    if not all(isinstance(c, (int, float)) and math.isfinite(c) for c in coords):
        return f"box {box['label']!r} has a non-finite coordinate"
    x1, y1, x2, y2 = coords
    if any(c < 0.0 or c > 1.0 for c in coords):
        return f"box {box['label']!r} ({x1:.3g}, {y1:.3g}, {x2:.3g}, {y2:.3g}) is outside [0, 1]"
    if x2 <= x1 or y2 <= y1:
        return f"box {box['label']!r} ({x1:.3g}, {y1:.3g}, {x2:.3g}, {y2:.3g}) has x2<=x1 or y2<=y1"
    return None


def _patients_in_two_splits(patients: list[str], splits: list[str], ids: list[str]) -> list[Problem]:
    """One Problem per patient whose rows sit in two splits, at the first row of the second split."""
    patient_splits: dict[str, dict[str, int]] = {}
    for i, (patient, split) in enumerate(zip(patients, splits, strict=True)):
        if patient and split in SPLITS:
            patient_splits.setdefault(patient, {}).setdefault(split, i)
    problems = []
    for patient, found in patient_splits.items():
        if len(found) > 1:
            rows = sorted(found.values())
            detail = ", ".join(f"{s} (row {r})" for s, r in sorted(found.items(), key=lambda kv: kv[1]))
            problems.append(
                Problem(rows[1], "patient_id", f"patient {patient!r} is in two splits: {detail}", ids[rows[1]])
            )
    return problems


def validate_manifest(
    df: pd.DataFrame,
    root: str | Path | None = None,
    check_files: bool = False,
    vocabulary: Iterable[str] | None = None,
    allow_outside: bool = True,
) -> list[Problem]:
    """Every problem in the manifest, one `Problem` per bad cell (empty list when the manifest is good).

    Checks: required columns, empty ids, duplicate image_id, labels outside the vocabulary (default
    `retrieval.labels.LABELS`), boxes out of [0, 1] or with x2<=x1/y2<=y1, unknown or empty split, a patient
    in two splits, unparseable cells, labels joined by a comma, (without `allow_outside`) a recorded dataset root
    that does not exist and image paths that leave both `root` (default ``df.attrs["root"]``) and the recorded
    dataset roots, and (with `check_files`) image files that do not exist."""
    problems: list[Problem] = []
    missing = [c for c in REQUIRED if c not in df.columns]
    for col in missing:
        problems.append(Problem(None, col, "required column is missing"))
    if missing:
        return problems
    if not isinstance(df.attrs.get(PARSE_PROBLEMS_ATTR), list) or any(
        not isinstance(v, list) for v in df.get("labels", pd.Series(dtype=object))
    ):
        df = normalize_manifest(df)
    problems.extend(df.attrs.get(PARSE_PROBLEMS_ATTR, []))
    vocab = set(_vocabulary() if vocabulary is None else vocabulary)
    root = root if root is not None else df.attrs.get("root")
    also_inside = [] if allow_outside else dataset_roots.recorded_roots(df)
    missing_root = dataset_roots.missing_root(also_inside)
    if missing_root:
        problems.append(Problem(None, "dataset_root", missing_root))

    ids = text_column(df["image_id"]).tolist()
    cols = {c: text_column(df[c]).tolist() for c in ("study_id", "patient_id", "split")}
    cols["image_path"] = path_column(df["image_path"]).tolist()
    cols["image_id"] = ids
    seen: dict[str, int] = {}
    for i, (image_id, labels, boxes) in enumerate(zip(ids, df["labels"], df["boxes"], strict=True)):
        for col in ("image_id", "study_id", "patient_id"):
            if not cols[col][i]:
                problems.append(Problem(i, col, "empty id", image_id))
        if image_id:
            if image_id in seen:
                problems.append(Problem(i, "image_id", f"duplicate of row {seen[image_id]}", image_id))
            else:
                seen[image_id] = i
        for label in labels:
            if "," in label:
                problems.append(Problem(i, "labels", f"{label!r} {COMMA_JOINED}", image_id))
            elif label not in vocab:
                problems.append(Problem(i, "labels", f"{label!r} is not in the label vocabulary", image_id))
        for box in boxes:
            reason = _box_problem(box)
            if reason:
                problems.append(Problem(i, "boxes", reason, image_id))
        split = cols["split"][i]
        if not split:
            problems.append(Problem(i, "split", "empty split (assign_splits fills it by patient)", image_id))
        elif split not in SPLITS:
            problems.append(Problem(i, "split", f"unknown split {split!r} (expected one of {SPLITS})", image_id))
        if check_files or (not allow_outside and cols["image_path"][i]):
            try:
                path = resolve_image_path(root, cols["image_path"][i], allow_outside, also_inside)
            except ManifestError as e:
                problems.append(Problem(i, "image_path", str(e), image_id))
            else:
                if check_files and not path.is_file():
                    problems.append(Problem(i, "image_path", f"file not found: {path}", image_id))

    problems.extend(_patients_in_two_splits(cols["patient_id"], cols["split"], ids))
    problems.sort(key=lambda p: -1 if p.row is None else p.row)
    return problems


# ------------------------------------------------------------------------------------------ the shared gate


def blocks_use(problem: Problem) -> bool:
    """True for a problem that makes a row unusable for build, add and training: an empty or duplicate id, a
    cell that cannot be parsed, comma-joined labels, an unknown (e.g. numeric) split, or a path that leaves the
    manifest folder. Labels outside the vocabulary, empty splits and box ranges are warnings."""
    if problem.row is None:
        return True
    col, msg = problem.column, problem.message
    if col in ("image_id", "study_id") or (col == "patient_id" and msg == "empty id"):
        return True
    if col in ("labels", "boxes") and msg.startswith("cannot parse"):
        return True
    if col == "labels" and msg.endswith(COMMA_JOINED):
        return True
    if col == "split" and msg.startswith("unknown split"):
        return True
    return col == "image_path" and "outside the manifest folder" in msg


@dataclass
class CheckedManifest:
    """What `check_manifest` lets through: the usable rows (index reset), their positions in the manifest, the
    refused rows (row, image_id, path, reason) and the warnings."""

    rows: pd.DataFrame
    positions: np.ndarray
    refused: pd.DataFrame
    warnings: list[Problem]


def check_manifest(
    df: pd.DataFrame,
    root: str | Path | None = None,
    allow_outside: bool = False,
    skip_bad_rows: bool = False,
    what: str = "",
) -> CheckedManifest:
    """The validator every entry point runs (build, add, train, VLM training): `validate_manifest`, then rows
    with a problem that `blocks_use` are refused, failing before any work with one line that lists them, or,
    with `skip_bad_rows`, dropped and returned in `refused` for the bad-rows report. Never stored."""
    import logging

    where = what or df.attrs.get("path") or "manifest"
    if not isinstance(df.attrs.get(PARSE_PROBLEMS_ATTR), list):
        attrs = dict(df.attrs)
        df = normalize_manifest(df)
        df.attrs.update({k: v for k, v in attrs.items() if k != PARSE_PROBLEMS_ATTR})
    root = root if root is not None else df.attrs.get("root")
    problems = validate_manifest(df, root, allow_outside=allow_outside)
    table = [p for p in problems if p.row is None]
    if table:
        raise ManifestError(f"{where}: " + "; ".join(f"{p.column}: {p.message}" for p in table))
    fatal = [p for p in problems if blocks_use(p)]
    warnings = [p for p in problems if not blocks_use(p)]
    if warnings:
        logging.getLogger(__name__).warning("%s: %d warning(s), e.g. %s", where, len(warnings), warnings[0])
    bad_rows = sorted({p.row for p in fatal})
    if fatal and not skip_bad_rows:
        shown = "; ".join(short_text(str(p)) for p in fatal[:2])
        shown += f"; and {len(fatal) - 2} more" if len(fatal) > 2 else ""
        outside = any(p.column == "image_path" for p in fatal)
        raise ManifestError(
            f"{where}: {len(bad_rows)} row(s) cannot be used ({shown}); fix them"
            + (", pass --allow-outside for paths outside the manifest's folder" if outside else "")
            + ", or pass --skip-bad-rows to skip them (they are listed in the bad-rows report)"
        )
    reasons: dict[int, list[str]] = {}
    for p in fatal:
        reasons.setdefault(p.row, []).append(f"manifest: {p.column}: {p.message}")
    paths = path_column(df["image_path"]).tolist()
    ids = text_column(df["image_id"]).tolist()
    refused = pd.DataFrame(
        {
            "row": bad_rows,
            "image_id": [ids[r] for r in bad_rows],
            "path": [paths[r] for r in bad_rows],
            "reason": ["; ".join(reasons[r]) for r in bad_rows],
        },
        columns=["row", "image_id", "path", "reason"],
    )
    keep = np.setdiff1d(np.arange(len(df)), np.asarray(bad_rows, dtype=np.int64))
    rows = df.iloc[keep].reset_index(drop=True)
    rows.attrs = dict(df.attrs)
    rows.attrs[PARSE_PROBLEMS_ATTR] = []
    return CheckedManifest(rows, keep, refused, warnings)


def gate_manifest(
    path: str | Path, allow_outside: bool = False, skip_bad_rows: bool = False
) -> str | Path | pd.DataFrame:
    """For the training commands: run `check_manifest` on a manifest file before any work; returns the path
    itself when every row is usable (so nothing downstream changes), else the usable rows (with `skip_bad_rows`,
    after logging how many were skipped)."""
    import logging

    checked = check_manifest(read_manifest(path), allow_outside=allow_outside, skip_bad_rows=skip_bad_rows)
    if not len(checked.refused):
        return path
    logging.getLogger(__name__).warning("%s: skipped %d unusable row(s): %s", path, len(checked.refused),
                                        "; ".join(checked.refused["reason"].head(3)))  # fmt: skip
    return checked.rows


def require_inside(path: str | Path, allow_outside: bool = False) -> None:
    """The containment rule alone, for the commands that read a manifest without the full gate (`cxr eval
    retrieval|generation`): a row whose image path leaves the manifest's folder and its recorded dataset roots
    (symlinks resolved) is a ManifestError naming it, unless `allow_outside`."""
    if allow_outside:
        return
    df = read_manifest(path)
    root, also_inside = df.attrs.get("root"), dataset_roots.existing_roots(df)
    for i, cell in enumerate(path_column(df["image_path"]).tolist() if "image_path" in df.columns else []):
        if cell:
            try:
                resolve_image_path(root, cell, False, also_inside)
            except ManifestError as e:
                raise ManifestError(f"{path}: row {i}: {e}") from None


def summarize_manifest(df: pd.DataFrame, problems: Sequence[Problem | str] | None = None) -> dict[str, Any]:
    """Counts a person wants after an import: studies, images, patients, per-label image counts, boxes (total
    and per label), splits, views, images without a file, and the problems (strings) passed in, or by default
    those `validate_manifest` finds (files not checked)."""

    def col(name: str) -> list[Any]:
        if name not in df.columns:
            return []
        return list(df[name]) if name in ("labels", "boxes") else text_column(df[name]).tolist()

    if problems is None:
        problems = validate_manifest(df)
    label_counts = Counter(label for labels in col("labels") for label in labels)
    box_counts = Counter(box.get("label", "") for boxes in col("boxes") for box in boxes)
    return {
        "studies": len(set(col("study_id")) - {""}),
        "images": len(df),
        "patients": len(set(col("patient_id")) - {""}),
        "labels": dict(label_counts.most_common()),
        "images_with_labels": sum(1 for labels in col("labels") if labels),
        "boxes": sum(box_counts.values()),
        "boxes_per_label": dict(box_counts.most_common()),
        "images_with_boxes": sum(1 for boxes in col("boxes") if boxes),
        "splits": dict(Counter(v or "(none)" for v in col("split")).most_common()),
        "views": dict(Counter(v or "(none)" for v in col("view")).most_common()),
        "sources": dict(Counter(v or "(none)" for v in col("source")).most_common()),
        "images_without_file": sum(1 for v in col("image_path") if not v),
        "problems": [str(p) for p in problems],
    }
