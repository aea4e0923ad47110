"""What a DICOM header says, for the importers: read it without the pixels, decide whether the instance is a
projection radiograph to keep (CR/DX), a report (SR) or something to skip (and why), and turn it into a manifest row.

Both DICOM importers (`importers/dicom_folder.py`, `importers/dicomweb.py`) sort the headers they read with
`InstanceScan.take` (`header_row`, `skip_reason`, the SR text), so the same instance gives the same row wherever it
came from. A DICOM row's ids are its UIDs:
image_id = SOPInstanceUID, study_id = StudyInstanceUID; patient_id = PatientID (or its keyed pseudonym, with
the study UID standing in when the tag is empty). The header's other identifying tags are never stored.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from retrieval.data.importers.common import normalize_view
from retrieval.data.pseudonym import Pseudonymizer

RADIOGRAPH_MODALITIES = ("CR", "DX")
UID_TAGS = ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID")
# SOP classes of secondary captures (screenshots, scanned films), skipped even when the modality says CR/DX.
SECONDARY_CAPTURE_PREFIX = "1.2.840.10008.5.1.4.1.1.7"
SR_PREFIX = "1.2.840.10008.5.1.4.1.1.88."
# Raw detector data, not meant to be looked at (its display-ready twin is FOR PRESENTATION).
FOR_PROCESSING_CLASSES = (
    "1.2.840.10008.5.1.4.1.1.1.1.1",
    "1.2.840.10008.5.1.4.1.1.1.2.1",
    "1.2.840.10008.5.1.4.1.1.1.3.1",
)
# pydicom reads a broken file leniently and only warns; these warnings mean the header is not what it says.
_DAMAGE_WORDS = ("end of file", "delimiter", "truncated", "expected", "invalid tag", "unknown encoding")


class HeaderError(Exception):
    """A file whose header cannot be read; `reason` is the one line the importer lists."""

    def __init__(self, reason: str):
        self.reason = reason
        super().__init__(reason)


def read_header(path: str | Path, force: bool = False) -> Any:
    """The dataset of `path` without its pixel data. `force` reads a file without the 'DICM' preamble.

    Raises HeaderError('damaged header: ...') when pydicom fails or warns that the header is broken, or when it
    holds none of the tags an instance has."""
    import pydicom

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True, force=force)
        except Exception as e:  # pydicom raises many types for a broken file
            raise HeaderError(f"damaged header: {type(e).__name__}: {str(e)[:120]}") from None
    for w in caught:
        text = str(w.message)
        if any(word in text.lower() for word in _DAMAGE_WORDS):
            raise HeaderError(f"damaged header: {text[:120]}")
    if "SOPClassUID" not in ds and "Modality" not in ds and "StudyInstanceUID" not in ds:
        raise HeaderError("damaged header: no SOP class, modality or study UID")
    return ds


def tag_text(ds: Any, name: str) -> str:
    """A tag's value as stripped text ('' when absent or empty)."""
    value = ds.get(name, "")
    return str(value if value is not None else "").strip()


def is_report(ds: Any) -> bool:
    """True for a structured report (SR SOP class or modality SR)."""
    return tag_text(ds, "SOPClassUID").startswith(SR_PREFIX) or tag_text(ds, "Modality") == "SR"


def skip_reason(ds: Any) -> str | None:
    """Why an instance is not a projection radiograph to keep, or None to keep it: a missing or malformed UID,
    a secondary capture, raw detector data (DX/MG/IO 'for processing'), a modality other than CR/DX."""
    from pydicom.uid import UID

    for tag in UID_TAGS:
        value = tag_text(ds, tag)
        if not value:
            return f"missing {tag}"
        if not UID(value).is_valid:
            return f"invalid {tag} {value[:70]!r}"
    if tag_text(ds, "SOPClassUID").startswith(SECONDARY_CAPTURE_PREFIX):
        return "secondary capture"
    if (
        tag_text(ds, "SOPClassUID") in FOR_PROCESSING_CLASSES
        or tag_text(ds, "PresentationIntentType") == "FOR PROCESSING"
    ):
        return "for processing (raw detector data)"
    modality = tag_text(ds, "Modality")
    if modality not in RADIOGRAPH_MODALITIES:
        return f"modality {modality or 'missing'}"
    return None


def header_row(ds: Any, image_path: str | Path, source: str, pseudonymize: Pseudonymizer | None = None) -> dict:
    """The manifest row of a kept radiograph (report text filled in later by the importer)."""
    study = tag_text(ds, "StudyInstanceUID")
    patient = tag_text(ds, "PatientID")
    accession = tag_text(ds, "AccessionNumber")
    if pseudonymize is not None:
        patient, accession = pseudonymize(patient, "PatientID"), pseudonymize(accession, "AccessionNumber")
    return {
        "image_id": tag_text(ds, "SOPInstanceUID"),
        "study_id": study,
        "patient_id": patient or study,
        "image_path": str(image_path),
        "view": normalize_view(tag_text(ds, "ViewPosition")),
        "source": source,
        "study_instance_uid": study,
        "series_instance_uid": tag_text(ds, "SeriesInstanceUID"),
        "sop_instance_uid": tag_text(ds, "SOPInstanceUID"),
        "accession_number": accession,
        "study_date": tag_text(ds, "StudyDate"),
        "modality": tag_text(ds, "Modality"),
    }


def _text_items(items: Any) -> Iterator[str]:
    for item in items or ():
        if tag_text(item, "ValueType") == "TEXT" and tag_text(item, "TextValue"):
            yield tag_text(item, "TextValue")
        yield from _text_items(item.get("ContentSequence"))


def report_text(ds: Any) -> str:
    """The text content of an SR document: every TEXT item's value, depth first, joined by spaces."""
    return " ".join(_text_items(ds.get("ContentSequence")))


@dataclass
class InstanceScan:
    """What a pass over DICOM instances keeps: the rows of the radiographs (`header_row`, `source` and
    `pseudonymize` as given), the SR report texts by study UID (several SRs of a study joined), and the skipped
    instances as 'where: reason'."""

    source: str
    pseudonymize: Pseudonymizer | None = None
    rows: list[dict] = field(default_factory=list)
    sr_texts: dict[str, str] = field(default_factory=dict)
    skipped: list[str] = field(default_factory=list)

    def skip(self, where: str, reason: str) -> None:
        self.skipped.append(f"{where}: {reason}")

    def take(self, where: str, ds: Any, path: Path, study: str | None = None) -> str:
        """Sort one header read from `path`: a report gives its study's text (`study`, default its
        StudyInstanceUID), a radiograph a row, anything else a skipped line. Returns 'report' (its text used),
        'empty report' (no text or no study UID), 'row' or 'skipped'."""
        if is_report(ds):
            text, study = report_text(ds), study or str(ds.get("StudyInstanceUID", "") or "")
            if not (text and study):
                return "empty report"
            self.sr_texts[study] = " ".join(x for x in (self.sr_texts.get(study, ""), text) if x)
            return "report"
        reason = skip_reason(ds)
        if reason:
            self.skip(where, reason)
            return "skipped"
        self.rows.append(header_row(ds, path.resolve(), self.source, self.pseudonymize))
        return "row"
