"""MIMIC-CXR (-JPG): the PhysioNet CSVs, the free-text reports and the JPEG images.

From `src` (the folder holding the CSVs): mimic-cxr-2.0.0-metadata.csv(.gz) (required), -split.csv(.gz) and
-chexpert.csv(.gz) (optional). Reports: <reports>/files/pXX/pYYYYYYYY/sZZZZZZZZ.txt (default reports = src);
FINDINGS and IMPRESSION sections are parsed out. Images: <images>/files/pXX/pYYYYYYYY/sZZZZZZZZ/<dicom_id>.jpg
(default images = src). CheXpert labels: 1.0 positive, -1.0 uncertain counted as positive (the "U-Ones"
policy of the CheXpert paper: uncertain mentions are usually present findings), 0.0 or blank negative; a study
with no positive label is "No Finding". Studies missing from the CheXpert file are rule-labelled.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pandas as pd

from retrieval.data.importers.common import finish, normalize_split, normalize_view, read_csv_text
from retrieval.errors import ImportError_
from retrieval.progress import track

PREFIX = "mimic-cxr-2.0.0-"
_SECTION = re.compile(r"^[ \t]*([A-Z][A-Z &/()-]{2,}?)[ \t]*:", re.MULTILINE)


def parse_sections(text: str) -> dict[str, str]:
    """A MIMIC report's 'HEADER:' sections (FINDINGS, IMPRESSION, INDICATION ...), whitespace collapsed."""
    out: dict[str, str] = {}
    matches = list(_SECTION.finditer(text))
    for m, nxt in zip(matches, matches[1:] + [None], strict=True):
        body = text[m.end() : nxt.start() if nxt else len(text)]
        out[m.group(1).strip()] = " ".join(body.split())
    return out


def _find_csv(folder: Path, name: str) -> Path | None:
    for suffix in (".csv.gz", ".csv"):
        for path in (folder / f"{PREFIX}{name}{suffix}", folder / f"{name}{suffix}"):
            if path.is_file():
                return path
    return None


def _id(prefix: str, value: str) -> str:
    value = str(value).strip()
    if value.endswith(".0"):  # ids written as floats by some exports
        value = value[:-2]
    return value if value.startswith(prefix) or not value else f"{prefix}{value}"


def chexpert_labels(row: dict[str, str], label_columns: list[str]) -> list[str]:
    """Positive labels of one CheXpert row: 1.0 and -1.0 (uncertain, counted positive) -> present."""
    positive = []
    for col in label_columns:
        value = str(row.get(col, "")).strip()
        try:
            number = float(value) if value else 0.0
        except ValueError:
            number = 0.0
        if number in (1.0, -1.0):
            positive.append(col)
    if len(positive) > 1 and "No Finding" in positive:
        positive.remove("No Finding")
    return positive or ["No Finding"]


def import_mimic_cxr(
    src: str | Path,
    images: str | Path | None = None,
    reports: str | Path | None = None,
    seed: int = 0,
    **_: Any,
) -> pd.DataFrame:
    """A manifest from a MIMIC-CXR-JPG folder (CSV files + files/ tree) and its reports."""
    src = Path(src)
    if not src.is_dir():
        raise ImportError_(f"{src}: not a folder (give the folder holding {PREFIX}metadata.csv.gz)")
    meta_path = _find_csv(src, "metadata")
    if meta_path is None:
        raise ImportError_(f"{src}: {PREFIX}metadata.csv(.gz) not found")
    meta = read_csv_text(meta_path)
    missing = [c for c in ("dicom_id", "subject_id", "study_id") if c not in meta.columns]
    if missing:
        raise ImportError_(f"{meta_path}: missing column(s) {', '.join(missing)}")
    notes: list[str] = []
    problems: list[str] = []
    splits = _read_splits(src, notes)
    chexpert = _read_chexpert(src, notes)
    image_root = Path(images) if images else src
    have_images = (image_root / "files").is_dir()
    if not have_images:
        notes.append(f"no image tree at {image_root / 'files'}: image_path left empty")
    reader = _ImageRows(meta_path.name, Path(reports) if reports else src, image_root if have_images else None)
    rows = []
    for rec in track(meta.to_dict("records"), "mimic-cxr images", unit="images"):
        row = reader.row(rec, problems)
        if row is not None:
            rows.append({**row, "labels": reader.labels(chexpert, row), "split": splits.get(row["image_id"], "")})
    if reader.labelled_by_rules and chexpert:
        notes.append(f"{reader.labelled_by_rules} images of studies missing from the CheXpert file: rule labeler used")
    return finish(rows, "mimic-cxr", seed=seed, problems=problems, notes=notes)


def _read_splits(src: Path, notes: list[str]) -> dict[str, str]:
    """dicom_id -> split from the split file (none: a note, and splits are assigned by patient)."""
    split_path = _find_csv(src, "split")
    if split_path is None:
        notes.append("no split file: splits assigned by patient")
        return {}
    split_df = read_csv_text(split_path)
    return {d: normalize_split(s) for d, s in zip(split_df["dicom_id"], split_df["split"], strict=True)}


def _read_chexpert(src: Path, notes: list[str]) -> dict[str, list[str]]:
    """study id -> labels from the CheXpert file (none: a note, and the rule labeler reads the reports)."""
    from retrieval.labels import LABELS

    chex_path = _find_csv(src, "chexpert")
    if chex_path is None:
        notes.append("no CheXpert file: labels from the rule labeler on the report text")
        return {}
    chex = read_csv_text(chex_path)
    cols = [c for c in chex.columns if c in LABELS]
    return {_id("s", rec["study_id"]): chexpert_labels(rec, cols) for rec in chex.to_dict("records")}


def read_report(path: Path) -> tuple[str, str, str] | None:
    """(report, findings, impression) of one report file: FINDINGS + IMPRESSION, else the whole text without its
    FINAL REPORT header; None when the file cannot be read."""
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return None
    sections = parse_sections(text)
    findings, impression = sections.get("FINDINGS", ""), sections.get("IMPRESSION", "")
    report = " ".join(x for x in (findings, impression) if x) or " ".join(re.sub(r"^\s*FINAL REPORT", "", text).split())
    return report, findings, impression


class _ImageRows:
    """Metadata records -> manifest rows: each study's report read once, its image found (when there is an image
    tree), skipped records explained in `problems`."""

    def __init__(self, meta_name: str, report_root: Path, image_root: Path | None):
        self.meta_name, self.report_root, self.image_root = meta_name, report_root, image_root
        self.reports: dict[str, tuple[str, str, str] | None] = {}
        self.labelled_by_rules = 0

    def row(self, rec: dict, problems: list[str]) -> dict | None:
        dicom_id = rec["dicom_id"].strip()
        subject, study = _id("p", rec["subject_id"]), _id("s", rec["study_id"])
        if not dicom_id or subject == "" or study == "":
            problems.append(f"{self.meta_name}: row with empty dicom_id/subject_id/study_id, skipped")
            return None
        rel = Path("files") / subject[:3] / subject / study
        if study not in self.reports:
            self.reports[study] = read_report(self.report_root / rel.with_suffix(".txt"))
        entry = self.reports[study]
        if entry is None:
            problems.append(f"{dicom_id}: report {rel.with_suffix('.txt')} not found, skipped")
            return None
        report, findings, impression = entry
        path = ""
        if self.image_root is not None:
            image = self.image_root / rel / f"{dicom_id}.jpg"
            if not image.is_file():
                problems.append(f"{dicom_id}: image {rel / (dicom_id + '.jpg')} not found, skipped")
                return None
            path = str(image.resolve())
        return {
            "image_id": dicom_id,
            "study_id": study,
            "patient_id": subject,
            "image_path": path,
            "view": normalize_view(rec.get("ViewPosition", "")),
            "report": report,
            "findings": findings,
            "impression": impression,
        }

    def labels(self, chexpert: dict[str, list[str]], row: dict) -> list[str]:
        """The study's CheXpert labels, else the rule labeler's reading of its report."""
        from retrieval.labels import label_report

        labels = chexpert.get(row["study_id"])
        if labels is None:
            labels = label_report(row["report"])
            self.labelled_by_rules += 1
        return labels
