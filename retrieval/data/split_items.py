"""Manifest rows -> study items: the images and studies (one report each) of a split, with multi-hot labels,
as training and evaluation read them (`SplitItems`, `split_items`)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from retrieval.labels import LABELS, NO_FINDING


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


def _study_text(row: pd.Series) -> str:
    report = str(row.get("report", "") or "").strip()
    if report:
        return report
    parts = [str(row.get(c, "") or "").strip() for c in ("findings", "impression")]
    return " ".join(p for p in parts if p)


def _labels_of(labels: Sequence[str], text: str) -> list[str]:
    if len(labels):
        return list(labels)
    if text:
        from retrieval.labels import label_report

        return list(label_report(text))
    return [NO_FINDING]


def split_items(df: pd.DataFrame, split: str | None, check_files: bool = True) -> SplitItems:
    """The images and studies of `split` (None = all rows). Studies without any report text and images
    whose file is missing are skipped and listed in `skipped`; empty label lists get the report labeler's."""
    from retrieval.data.manifest import resolve_image_path
    from retrieval.errors import ManifestError
    from retrieval.losses import multi_hot

    rows = df if split is None else df[df["split"] == split]
    if len(rows) == 0:
        raise ManifestError(f"no rows in split {split!r} (splits present: {sorted(set(df['split']))})")
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
        text = _study_text(row)
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
    m = multi_hot(all_sets).numpy()
    names = list(LABELS) + [f"extra_{i}" for i in range(m.shape[1] - len(LABELS))]
    seen_extra = [lab for labs in all_sets for lab in labs if lab not in LABELS]
    for i, name in enumerate(dict.fromkeys(seen_extra)):
        names[len(LABELS) + i] = name
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
