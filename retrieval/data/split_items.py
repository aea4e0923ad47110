"""Manifest rows -> the rows of a split, and their study items.

`split_positions(df, split)` is the one step from a manifest to the rows of a split: the retrieval trainer and
evaluation (through `split_items`), the VLM's training and evaluation and the image-text-to-text fine-tuning all
select their rows with it, in manifest order, with one error when the split has none.
`split_items` turns those rows into the images and studies (one report each) with multi-hot labels, as retrieval
training and evaluation read them (`SplitItems`). A study's text is `study_text.report_text`; its label matrix
`labels.label_matrix`."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from retrieval.labels import LABELS, NO_FINDING, label_matrix
from retrieval.study_text import report_text


@dataclass
class SplitItems:
    """What a split's retrieval is evaluated on: images (queries/gallery) and studies (one report each)."""

    image_ids: list[str]
    image_paths: list[str]
    image_study: np.ndarray  # (I,) index into studies
    image_patient: np.ndarray  # (I,) patient code
    image_labels: np.ndarray  # (I, L) bool
    study_ids: list[str]
    reports: list[str]
    study_labels: np.ndarray  # (S, L) bool
    label_names: list[str] = field(default_factory=lambda: list(LABELS))
    skipped: list[str] = field(default_factory=list)  # "image_id: reason"
    labelled_by_labeler: int = 0  # images whose manifest labels were empty: labels read from the report text


def _labels_of(labels: Sequence[str], text: str) -> list[str]:
    if len(labels):
        return list(labels)
    if text:
        from retrieval.labels import label_report

        return list(label_report(text))
    return [NO_FINDING]


def split_positions(df: pd.DataFrame, split: str | None) -> list[int]:
    """Positions (in manifest order) of the rows whose `split` is `split` (None = every row); a ManifestError
    naming the splits present when there are none, or when the manifest has no split column."""
    from retrieval.errors import ManifestError

    if split is None:
        positions = list(range(len(df)))
    elif "split" not in df.columns:
        raise ManifestError("the manifest has no split column; assign splits first (by patient)")
    else:
        positions = [i for i, s in enumerate(df["split"].astype(str)) if s == split]
    if not positions:
        present = sorted(set(df["split"].astype(str))) if "split" in df.columns else []
        raise ManifestError(f"no rows in split {split!r} (splits present: {present})")
    return positions


def split_items(df: pd.DataFrame, split: str | None, check_files: bool = True) -> SplitItems:
    """The images and studies of `split` (None = all rows). Studies without any report text and images
    whose file is missing are skipped and listed in `skipped`; empty label lists get the report labeler's."""
    from retrieval.data.manifest import resolve_image_path
    from retrieval.errors import ManifestError

    rows = df.iloc[split_positions(df, split)]
    root = df.attrs.get("root")
    skipped: list[str] = []
    study_index: dict[str, int] = {}
    reports: list[str] = []
    study_label_sets: list[set[str]] = []
    image_ids, paths, img_study, img_patient, img_labels = [], [], [], [], []
    patients: dict[str, int] = {}
    auto_labelled = 0
    for _, row in rows.iterrows():
        study = str(row["study_id"])
        text = report_text(row)
        if not text:
            skipped.append(f"{row['image_id']}: study {study} has no report text")
            continue
        try:
            path = resolve_image_path(root, row["image_path"])
        except ManifestError as e:
            skipped.append(f"{row['image_id']}: {e}")
            continue
        if check_files and not path.is_file():
            skipped.append(f"{row['image_id']}: image file not found: {path}")
            continue
        labels = _labels_of(row["labels"], text)
        auto_labelled += not len(row["labels"])
        if study not in study_index:
            study_index[study] = len(reports)
            reports.append(text)
            study_label_sets.append(set())
        s = study_index[study]
        study_label_sets[s].update(labels)
        image_ids.append(str(row["image_id"]))
        paths.append(str(path))
        img_study.append(s)
        img_patient.append(patients.setdefault(str(row["patient_id"]), len(patients)))
        img_labels.append(labels)
    if not image_ids:
        raise ManifestError(f"split {split!r}: no usable rows ({len(skipped)} skipped, e.g. {skipped[:1]})")
    all_sets = img_labels + [sorted(s) for s in study_label_sets]
    m, names = label_matrix(all_sets)
    n = len(image_ids)
    return SplitItems(
        image_ids=image_ids,
        image_paths=paths,
        image_study=np.asarray(img_study),
        image_patient=np.asarray(img_patient),
        image_labels=m[:n],
        study_ids=list(study_index),
        reports=reports,
        study_labels=m[n:],
        label_names=names,
        skipped=skipped,
        labelled_by_labeler=auto_labelled,
    )
