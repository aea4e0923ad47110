"""A drafted report as a DICOM Comprehensive SR (highdicom), and STOW-RS to an archive (dicomweb-client).

`cxr generate IMAGE --sr out.dcm [--store URL]`. The SR is a machine draft and says so in its header:
CompletionFlag PARTIAL, VerificationFlag UNVERIFIED, PreliminaryFlag PRELIMINARY, Manufacturer / model / software
version naming this software, and a device observer (TID 1004) as the author. It joins the source image's study
(patient and study attributes are copied from its header, the image is listed as evidence) in a new series.

The content tree (no template claimed; every item a highdicom content item):

    CONTAINER  Diagnostic Imaging Report (LN 18748-4)
      HAS OBS CONTEXT   the device observer: UID, name, manufacturer, model (highdicom's ObservationContext)
      HAS CONCEPT MOD   CODE Procedure reported (DCM 121058) = Plain radiography (SCT 168537006)
      CONTAINS          TEXT Findings (DCM 121070) = the drafted report, word for word
      CONTAINS          TEXT Comment (DCM 121106) = that this is an unverified machine draft
      CONTAINS          CODE Finding (DCM 121071) = each finding (FINDING_CODES), and per box of that finding:
        INFERRED FROM     SCOORD Image Region (DCM 111030), POLYLINE, the box's closed rectangle in pixel
                          coordinates (column, row) of the source image, the origin at its top left corner
          SELECTED FROM     IMAGE the source image (its SOP class and instance UIDs)
      CONTAINS          CONTAINER Retrieved similar studies (99CXR), per exemplar a CONTAINER holding
                          TEXT its study id in the index, UIDREF Study Instance UID (DCM 110180) when the index
                          knows it (rows imported from DICOM), NUM its retrieval similarity

Findings are coded with SNOMED CT where pydicom's code dictionary holds the concept, DICOM's own (DCM) for
Lung Opacity, and otherwise with the local scheme 99CXR (the "99" prefix DICOM reserves for private schemes),
declared in the CodingSchemeIdentificationSequence. A PNG or JPEG source is refused: an SR belongs in the study
of the image it describes, and a PNG carries no patient, study or instance to reference.
"""

from __future__ import annotations

import copy
import hashlib
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from retrieval.errors import CXRError, ImageReadError, UsageError

log = logging.getLogger(__name__)

LOCAL_SCHEME = "99CXR"
SOFTWARE = "cxr-retrieval"
# A fixed UID for this software as a device observer (2.25.<int> from a UUID, PS3.5 B.2): the same on every SR.
DEVICE_UID = "2.25.208513453216467003409396389738427549729"
SERIES_NUMBER = 9901  # a high number, apart from the modality's own series
SERIES_DESCRIPTION = "cxr-retrieval machine draft (unverified)"
DRAFT_NOTE = (
    "Machine-generated draft by {software} {version}: not reviewed or verified by a clinician; "
    "findings, regions and wording may be wrong."
)

# CheXpert-14 + Tuberculosis -> (value, scheme, meaning). SNOMED CT and DCM entries are the ones pydicom's code
# dictionary holds (tests/test_structured_report.py checks each against it); 99CXR are this project's own.
FINDING_CODES: dict[str, tuple[str, str, str]] = {
    "No Finding": ("408573005", "SCT", "Imaging result normal"),
    "Enlarged Cardiomediastinum": ("ECM", LOCAL_SCHEME, "Enlarged cardiomediastinum"),
    "Cardiomegaly": ("287272002", "SCT", "Cardiomegaly"),
    "Lung Opacity": ("112001", "DCM", "Opacity"),
    "Lung Lesion": ("52988006", "SCT", "Lesion"),
    "Edema": ("19242006", "SCT", "Pulmonary edema"),
    "Consolidation": ("CONSOLIDATION", LOCAL_SCHEME, "Consolidation"),
    "Pneumonia": ("PNEUMONIA", LOCAL_SCHEME, "Pneumonia"),
    "Atelectasis": ("ATELECTASIS", LOCAL_SCHEME, "Atelectasis"),
    "Pneumothorax": ("36118008", "SCT", "Pneumothorax"),
    "Pleural Effusion": ("60046008", "SCT", "Pleural effusion"),
    "Pleural Other": ("PLEURAL-OTHER", LOCAL_SCHEME, "Pleural abnormality, other"),
    "Fracture": ("FRACTURE", LOCAL_SCHEME, "Fracture"),
    "Support Devices": ("SUPPORT-DEVICES", LOCAL_SCHEME, "Support devices"),
    "Tuberculosis": ("TUBERCULOSIS", LOCAL_SCHEME, "Tuberculosis"),
}
LOCAL_CONCEPTS: dict[str, tuple[str, str]] = {  # key -> (value, meaning) in 99CXR
    "exemplars": ("EXEMPLARS", "Retrieved similar studies"),
    "exemplar": ("EXEMPLAR", "Retrieved similar study"),
    "study_id": ("INDEX-STUDY-ID", "Study identifier in the retrieval index"),
    "similarity": ("SIMILARITY", "Retrieval similarity"),
}


def finding_code(label: str) -> Any:
    """The coded concept of a finding label: FINDING_CODES, else a 99CXR code derived from the label's text (a box
    head group outside CheXpert-14), so a name always maps to the same code."""
    from pydicom.sr.coding import Code

    if label in FINDING_CODES:
        value, scheme, meaning = FINDING_CODES[label]
        return Code(value, scheme, meaning)
    digest = hashlib.sha256(label.encode()).hexdigest()[:10].upper()
    return Code(f"X{digest}", LOCAL_SCHEME, str(label)[:64] or "unnamed finding")


def _local(key: str) -> Any:
    from pydicom.sr.coding import Code

    value, meaning = LOCAL_CONCEPTS[key]
    return Code(value, LOCAL_SCHEME, meaning)


def read_source(path: str | Path) -> Any:
    """The source image's DICOM header (no pixels): what the SR copies and references. A PNG/JPEG, a file that is
    not DICOM, or a DICOM without the UIDs or the image size is a UsageError naming the file."""
    import pydicom
    from pydicom.errors import InvalidDicomError

    path = Path(path)
    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
    except (InvalidDicomError, OSError, ValueError) as e:
        if not path.is_file():
            raise ImageReadError(path, "file not found") from None
        raise UsageError(
            f"{path}: --sr needs a DICOM source image (the SR joins its study and references it); "
            f"this file is not DICOM ({type(e).__name__})"
        ) from None
    need = ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID", "Rows", "Columns")
    missing = [k for k in need if not str(ds.get(k, "") or "").strip()]
    if missing:
        raise UsageError(f"{path}: --sr needs a DICOM source with {', '.join(missing)}; it has none")
    return ds


# The patient and study attributes an SR copies from its source (type 2: present, possibly empty). Many archives'
# images lack some (a pseudonymised copy has no birth date): the SR gets them empty, as the standard allows.
COPIED_TYPE2 = (
    "PatientName", "PatientID", "PatientBirthDate", "PatientSex", "AccessionNumber", "StudyID", "StudyDate",
    "StudyTime", "ReferringPhysicianName",
)  # fmt: skip


def with_type2(source: Any) -> Any:
    """A copy of the source header with every attribute of COPIED_TYPE2 present (empty where it was absent)."""
    header = copy.deepcopy(source)
    for keyword in COPIED_TYPE2:
        if keyword not in header or header[keyword].value is None:
            setattr(header, keyword, "")
    return header


def box_polyline(box: dict, rows: int, columns: int) -> np.ndarray:
    """A box normalised to [0, 1] as the closed rectangle (5 points, column/row) in the image's pixel coordinates."""
    x1, x2 = (float(np.clip(box[k], 0.0, 1.0)) * columns for k in ("x1", "x2"))
    y1, y2 = (float(np.clip(box[k], 0.0, 1.0)) * rows for k in ("y1", "y2"))
    return np.array([[x1, y1], [x2, y1], [x2, y2], [x1, y2], [x1, y1]], dtype=np.float32)


def _finding_items(findings: Sequence[str], boxes: Sequence[dict], source: Any) -> list:
    """One CODE item per finding (those of the text, then those only a box names), each with its boxes."""
    import highdicom as hd
    from pydicom.sr.codedict import codes

    names = list(dict.fromkeys([*findings, *(str(b.get("label") or "") for b in boxes)]))
    items = []
    for name in [n for n in names if n]:
        item = hd.sr.CodeContentItem(
            codes.DCM.Finding, finding_code(name), relationship_type=hd.sr.RelationshipTypeValues.CONTAINS
        )
        regions = []
        for box in (b for b in boxes if str(b.get("label") or "") == name):
            region = hd.sr.ScoordContentItem(
                codes.DCM.ImageRegion,
                hd.sr.GraphicTypeValues.POLYLINE,
                box_polyline(box, int(source.Rows), int(source.Columns)),
                relationship_type=hd.sr.RelationshipTypeValues.INFERRED_FROM,
            )
            region.ContentSequence = hd.sr.ContentSequence(
                [hd.sr.SourceImageForRegion(str(source.SOPClassUID), str(source.SOPInstanceUID))]
            )
            regions.append(region)
        if regions:
            item.ContentSequence = hd.sr.ContentSequence(regions)
        items.append(item)
    return items


def _exemplar_items(exemplars: Sequence[dict]) -> list:
    """The retrieved studies the draft rests on: study id, Study Instance UID when known, similarity."""
    import highdicom as hd
    from pydicom.sr.codedict import codes

    contains = hd.sr.RelationshipTypeValues.CONTAINS
    outer = hd.sr.ContainerContentItem(_local("exemplars"), relationship_type=contains)
    inner = []
    for ex in exemplars:
        c = hd.sr.ContainerContentItem(_local("exemplar"), relationship_type=contains)
        parts = [hd.sr.TextContentItem(_local("study_id"), str(ex["study_id"]), relationship_type=contains)]
        if str(ex.get("study_instance_uid") or ""):
            uid = str(ex["study_instance_uid"])
            parts.append(hd.sr.UIDRefContentItem(codes.DCM.StudyInstanceUID, uid, relationship_type=contains))
        if ex.get("score") is not None:
            parts.append(
                hd.sr.NumContentItem(
                    _local("similarity"), float(ex["score"]), codes.UCUM.NoUnits, relationship_type=contains
                )
            )
        c.ContentSequence = hd.sr.ContentSequence(parts)
        inner.append(c)
    if not inner:
        return []
    outer.ContentSequence = hd.sr.ContentSequence(inner)
    return [outer]


def software_version() -> str:
    """This package's version (what the SR's SoftwareVersions and observer model name say)."""
    import importlib.metadata as md

    try:
        return md.version("cxr-retrieval")
    except md.PackageNotFoundError:
        return "0+unknown"


def build_sr(draft: dict, source: Any, sop_instance_uid: str | None = None) -> Any:
    """The draft (`draft.draft_for_image`'s dict: text, findings, boxes, exemplars) as a highdicom
    ComprehensiveSR in the study of `source` (a DICOM header, `read_source`). highdicom checks every item and
    the relationships as it builds; a draft it refuses is a CXRError."""
    import highdicom as hd
    from pydicom.sr.codedict import codes
    from pydicom.uid import generate_uid

    version = software_version()
    source = with_type2(source)
    contains = hd.sr.RelationshipTypeValues.CONTAINS
    device = hd.sr.DeviceObserverIdentifyingAttributes(
        uid=DEVICE_UID, name=SOFTWARE, manufacturer_name=SOFTWARE, model_name=f"{SOFTWARE} {version}"
    )
    context = hd.sr.ObservationContext(observer_device_context=hd.sr.ObserverContext(codes.DCM.Device, device))
    root = hd.sr.ContainerContentItem(codes.LN.DiagnosticImagingReport)
    items = [
        *context,
        hd.sr.CodeContentItem(
            codes.DCM.ProcedureReported,
            codes.SCT.PlainRadiography,
            relationship_type=hd.sr.RelationshipTypeValues.HAS_CONCEPT_MOD,
        ),
        hd.sr.TextContentItem(codes.DCM.Findings, str(draft.get("text") or ""), relationship_type=contains),
        hd.sr.TextContentItem(
            codes.DCM.Comment, DRAFT_NOTE.format(software=SOFTWARE, version=version), relationship_type=contains
        ),
        *_finding_items(draft.get("findings") or [], draft.get("boxes") or [], source),
        *_exemplar_items(draft.get("exemplars") or []),
    ]
    root.ContentSequence = hd.sr.ContentSequence(items, is_root=False)
    scheme = hd.coding_schemes.CodingSchemeIdentificationItem(
        designator=LOCAL_SCHEME, name="cxr-retrieval local codes", responsible_organization=SOFTWARE
    )
    try:
        return hd.sr.ComprehensiveSR(
            evidence=[source],
            content=root,
            series_instance_uid=generate_uid(),
            series_number=SERIES_NUMBER,
            sop_instance_uid=sop_instance_uid or generate_uid(),
            instance_number=1,
            manufacturer=SOFTWARE,
            is_complete=False,
            is_final=False,
            is_verified=False,
            series_description=SERIES_DESCRIPTION,
            manufacturer_model_name=SOFTWARE,
            software_versions=version,
            coding_schemes=[scheme],
        )
    except (ValueError, TypeError, AttributeError) as e:
        raise CXRError(f"the SR could not be built: {e}") from e


def write_sr(draft: dict, source_path: str | Path, out: str | Path) -> Any:
    """Build the SR for `draft` on the DICOM `source_path` and write it to `out` atomically; returns the
    dataset."""
    from retrieval.fileio import atomic_path

    sr = build_sr(draft, read_source(source_path))
    out = Path(out)
    with atomic_path(out) as tmp:
        sr.save_as(tmp, enforce_file_format=True)
    log.info(
        "wrote the draft SR %s (%d findings, %d boxes)",
        out,
        len(draft.get("findings") or []),
        len(draft.get("boxes") or []),
    )
    return sr


def store_sr(sr: Any, url: str, auth: Any = None) -> None:
    """Send the SR to a DICOMweb archive with STOW-RS, through the importer's client (`importers.dicomweb.make_client`:
    `auth` is its `Auth`, a bearer token or basic auth, or None). A refusal or an unreachable archive is one
    CXRError naming the URL, never a credential."""
    import requests

    from retrieval.data.importers.dicomweb import make_client

    try:
        client = make_client(url, auth)
        # 3 tries 0.5 s and 1 s apart (a busy or unreachable archive), not the client's default of 5 over 30 s
        client.set_http_retry_params(max_attempts=3, wait_exponential_multiplier=250)
        client.store_instances([sr])
    except requests.HTTPError as e:
        status = e.response.status_code if e.response is not None else "?"
        raise CXRError(f"{url}: STOW-RS refused the SR (HTTP {status})") from None
    except requests.RequestException as e:
        raise CXRError(f"{url}: STOW-RS failed ({type(e).__name__}: {str(e)[:160]})") from None
    log.info("stored the draft SR %s at %s", sr.SOPInstanceUID, url)
