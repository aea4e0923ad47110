"""Shared by the SR tests: a DX source radiograph, a draft, and what plain pydicom reads back from an SR."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
from dicom_maker import write_dicom
from pydicom.uid import generate_uid

DX_FOR_PRESENTATION = "1.2.840.10008.5.1.4.1.1.1.1"
ROWS, COLUMNS = 64, 80
DRAFT = {
    "text": "Small right pleural effusion. No pneumothorax. Heart size is normal.",
    "findings": ["Pleural Effusion", "Atelectasis"],
    "boxes": [
        {"label": "Pleural Effusion", "x1": 0.5, "y1": 0.6, "x2": 0.9, "y2": 0.95, "score": 0.8},
        {"label": "Pleural Effusion", "x1": 0.05, "y1": 0.7, "x2": 0.3, "y2": 1.0, "score": 0.6},
        {"label": "Nodule", "x1": 0.1, "y1": 0.1, "x2": 0.2, "y2": 0.25, "score": 0.7},  # a box-only finding
    ],
    "exemplars": [
        {"study_id": "s1", "score": 0.91, "study_instance_uid": "1.2.826.0.1.3680043.8.498.1"},
        {"study_id": "s2", "score": 0.85, "study_instance_uid": ""},  # a non-DICOM study: its id only
    ],
}


def write_source(path: Path, pixels: np.ndarray | None = None) -> Path:
    """A DX (for presentation) radiograph with the patient and study attributes a PACS sends."""
    pixels = np.zeros((ROWS, COLUMNS), np.uint8) if pixels is None else pixels
    return write_dicom(
        path,
        pixels,
        DX_FOR_PRESENTATION,
        StudyInstanceUID=generate_uid(),
        SeriesInstanceUID=generate_uid(),
        PatientID="PAT-1",
        PatientName="Test^Patient",
        PatientBirthDate="19700101",
        PatientSex="F",
        StudyDate="20240102",
        StudyTime="101010",
        AccessionNumber="ACC0001",
        StudyID="1",
        ReferringPhysicianName="",
    )


def walk(items, out=None, parents=()):
    """Every content item of an SR, depth first, as (path of parent concept meanings, item): plain pydicom."""
    out = [] if out is None else out
    for item in items:
        out.append((parents, item))
        if "ContentSequence" in item:
            walk(item.ContentSequence, out, (*parents, item.ConceptNameCodeSequence[0].CodeMeaning))
    return out


def read_back(path: Path) -> dict:
    """What a PACS client reads from the file with pydicom alone: text, findings with their regions, exemplars."""
    ds = pydicom.dcmread(path)
    items = walk(ds.ContentSequence)
    name = lambda it: it.ConceptNameCodeSequence[0].CodeMeaning  # noqa: E731
    text = [it.TextValue for _, it in items if it.ValueType == "TEXT" and name(it) == "Findings"]
    findings = {}
    for _, it in items:
        if it.ValueType == "CODE" and name(it) == "Finding":
            code = it.ConceptCodeSequence[0]
            regions = []
            for sub in it.get("ContentSequence", []):
                assert sub.ValueType == "SCOORD" and sub.RelationshipType == "INFERRED FROM"
                ref = sub.ContentSequence[0]
                assert ref.ValueType == "IMAGE" and ref.RelationshipType == "SELECTED FROM"
                regions.append(
                    (
                        sub.GraphicType,
                        np.asarray(sub.GraphicData, dtype=np.float64).reshape(-1, 2),
                        ref.ReferencedSOPSequence[0].ReferencedSOPInstanceUID,
                    )
                )
            findings[(code.CodeValue, code.CodingSchemeDesignator)] = regions
    exemplars = []
    for parents, it in items:
        if it.ValueType == "CONTAINER" and name(it) == "Retrieved similar study":
            kids = {name(k): k for k in it.ContentSequence}
            uid = kids.get("Study Instance UID")
            exemplars.append((kids["Study identifier in the retrieval index"].TextValue, uid.UID if uid else ""))
    return {"ds": ds, "text": text, "findings": findings, "exemplars": exemplars}


def expected_polyline(box: dict) -> np.ndarray:
    """The naive reference: the box's corners scaled by the image's columns and rows, closed."""
    x1, y1, x2, y2 = box["x1"] * COLUMNS, box["y1"] * ROWS, box["x2"] * COLUMNS, box["y2"] * ROWS
    return np.array([[x1, y1], [x2, y1], [x2, y2], [x1, y2], [x1, y1]])
