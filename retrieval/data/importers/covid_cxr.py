"""The COVID-19 image data collection (ieee8023/covid-chestxray-dataset schema) plus optional COCO lung boxes.

metadata.csv columns used: patientid, offset, finding ('Pneumonia/Viral/COVID-19', 'Tuberculosis',
'No Finding'), view, modality, folder, filename, clinical_notes. Report text = clinical_notes (may be empty);
labels come from `finding` (see common.map_finding). A study is a patient's images at one `offset` (days since
symptoms), or the image alone when the offset is unknown. Rows that are not X-rays or whose image file is
missing are skipped. Boxes (`boxes=`, default annotations/lung_boxes_coco.json when present) match by
file name.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd

from retrieval.data.importers.coco import boxes_by_image, read_coco
from retrieval.data.importers.common import finish, map_finding, normalize_view, read_csv_text
from retrieval.errors import ImportError_
from retrieval.progress import track

DEFAULT_BOXES = Path("annotations") / "lung_boxes_coco.json"


def read_coco_boxes(path: str | Path) -> tuple[dict[str, list[dict[str, Any]]], list[str]]:
    """COCO boxes by image file name (normalised by the COCO image size), and the problems met."""
    path = Path(path)
    entries, categories, annotations = read_coco(path)
    names = {e.get("id"): Path(str(e.get("file_name", ""))).name for e in entries if isinstance(e, dict)}
    by_id, problems = boxes_by_image(path.name, entries, categories, annotations)
    boxes: dict[str, list[dict[str, Any]]] = {}
    for image_id, found in by_id.items():
        boxes.setdefault(names[image_id], []).extend(found)
    return boxes, problems


def import_covid_cxr(
    src: str | Path,
    boxes: str | Path | None = None,
    images: str | Path | None = None,
    seed: int = 0,
    **_: Any,
) -> pd.DataFrame:
    """A manifest from a covid-chestxray-dataset folder (with metadata.csv) or the metadata.csv itself."""
    src = Path(src)
    meta_path = src / "metadata.csv" if src.is_dir() else src
    root = meta_path.parent
    if not meta_path.is_file():
        raise ImportError_(f"{meta_path}: metadata.csv not found (expected the ieee8023 covid-chestxray layout)")
    meta = read_csv_text(meta_path)
    missing = [c for c in ("patientid", "finding", "filename") if c not in meta.columns]
    if missing:
        raise ImportError_(f"{meta_path}: missing column(s) {', '.join(missing)} of the ieee8023 schema")

    problems: list[str] = []
    box_path = Path(boxes) if boxes else (root / DEFAULT_BOXES if (root / DEFAULT_BOXES).is_file() else None)
    boxes_by_name: dict[str, list[dict[str, Any]]] = {}
    if box_path is not None:
        boxes_by_name, box_problems = read_coco_boxes(box_path)
        problems.extend(box_problems)

    rows = []
    for i, rec in track(list(meta.iterrows()), "covid-cxr rows", unit="rows"):
        line = i + 2  # the CSV line (header is line 1)
        name = rec["filename"].strip()
        modality = rec.get("modality", "X-ray").strip()
        if modality and modality.lower() not in ("x-ray", "xray", "cr", "dx"):
            problems.append(f"{meta_path.name} line {line} ({name}): modality {modality!r} is not an X-ray, skipped")
            continue
        if not name or not rec["patientid"].strip():
            problems.append(f"{meta_path.name} line {line}: empty filename or patientid, skipped")
            continue
        folder = Path(images) if images else root / (rec.get("folder", "") or "images")
        path = folder / name
        if not path.is_file():
            problems.append(f"{meta_path.name} line {line}: image file missing: {path}")
            continue
        patient = rec["patientid"].strip()
        offset = rec.get("offset", "").strip()
        notes = " ".join(rec.get("clinical_notes", "").split())
        rows.append(
            {
                "image_id": name,
                "study_id": f"{patient}-d{offset}" if offset else f"{patient}-{Path(name).stem}",
                "patient_id": patient,
                "image_path": str(path.resolve()),
                "view": normalize_view(rec.get("view", "")),
                "report": notes,
                "labels": map_finding(rec["finding"]),
                "boxes": boxes_by_name.get(name, []),
                "finding": rec["finding"].strip(),
            }
        )
    unmatched = set(boxes_by_name) - {r["image_id"] for r in rows}
    if unmatched:
        problems.append(f"{len(unmatched)} box entries match no imported image (e.g. {sorted(unmatched)[0]!r})")
    notes = []
    unlabelled = [r["finding"] for r in rows if not r["labels"]]
    if unlabelled:
        kinds = ", ".join(sorted({repr(f) for f in unlabelled}))
        notes.append(f"{len(unlabelled)} images have a finding outside the vocabulary ({kinds}): no labels")
    if box_path is None:
        notes.append("no box file given and annotations/lung_boxes_coco.json not present: no boxes")
    return finish(rows, "covid-cxr", seed=seed, problems=problems, notes=notes)
