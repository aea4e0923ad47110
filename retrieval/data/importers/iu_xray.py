"""IU X-ray (Open-I, NLMCXR): the report XMLs that ship inside torchxrayvision, plus an optional PNG folder.

One row per image a report references (its parentImage ids). findings and impression are the report's
sections, report = findings + impression, `mesh` keeps the manual MeSH terms (<major>), labels come from the
rule labeler (retrieval.labels.label_report) on the report text. Patient = study = the report (Open-I has one
report per patient). Views come from torchxrayvision's nlmcxr_dicom_metadata.csv.gz when present.
Without an image folder image_path stays empty (the demo renders images for such rows).
"""

from __future__ import annotations

import functools
import re
import tarfile
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pandas as pd

from retrieval.data.importers.common import finish, index_images, normalize_view
from retrieval.errors import ImportError_
from retrieval.progress import track
from retrieval.study_text import report_text


def builtin_reports_path() -> Path:
    """NLMCXR_reports.tgz inside torchxrayvision's data folder (found without importing torch)."""
    import importlib.util

    spec = importlib.util.find_spec("torchxrayvision")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError_("torchxrayvision is not installed: give NLMCXR_reports.tgz instead of 'builtin'")
    return Path(list(spec.submodule_search_locations)[0]) / "data" / "NLMCXR_reports.tgz"


def parse_open_i_xml(data: bytes | str, name: str = "") -> dict[str, Any]:
    """One Open-I report XML -> {study_id, findings, impression, indication, comparison, mesh, images}.

    Raises ValueError when the XML cannot be parsed."""
    try:
        root = ET.fromstring(data)
    except ET.ParseError as e:
        raise ValueError(f"not valid XML ({e})") from None
    sections = {a.get("Label", "").upper(): " ".join((a.text or "").split()) for a in root.iter("AbstractText")}
    uid = root.find("uId")
    study = uid.get("id") if uid is not None and uid.get("id") else f"CXR{Path(name).stem}"
    return {
        "study_id": study,
        "findings": sections.get("FINDINGS", ""),
        "impression": sections.get("IMPRESSION", ""),
        "indication": sections.get("INDICATION", ""),
        "comparison": sections.get("COMPARISON", ""),
        "mesh": [m.text.strip() for m in root.iter("major") if m.text and m.text.strip()],
        "images": [p.get("id") for p in root.iter("parentImage") if p.get("id")],
    }


def iter_report_files(src: str | Path) -> Iterator[tuple[str, bytes]]:
    """(name, XML bytes) for every report in a .tgz/.tar archive or a folder of XMLs (recursive)."""
    path = builtin_reports_path() if str(src) == "builtin" else Path(src)
    if path.is_dir():
        for xml in sorted(path.rglob("*.xml")):
            yield xml.name, xml.read_bytes()
        return
    if not path.is_file():
        raise ImportError_(f"{path}: not found (give 'builtin', NLMCXR_reports.tgz, or a folder of report XMLs)")
    try:
        with tarfile.open(path, "r:*") as tar:
            for member in tar:
                if member.isfile() and member.name.endswith(".xml"):
                    f = tar.extractfile(member)
                    if f is not None:
                        yield Path(member.name).name, f.read()
    except (tarfile.TarError, OSError, EOFError) as e:
        raise ImportError_(f"{path}: cannot read the report archive: {e}") from None


def _report_number(name: str) -> int:
    digits = re.sub(r"\D", "", name)
    return int(digits) if digits else 0


def read_iu_reports(src: str | Path = "builtin") -> list[dict[str, Any]]:
    """Every Open-I report that parses (`parse_open_i_xml`'s fields plus `number`, from the file name), in
    report-number order; parsed once per process and source (a copy of each record is returned)."""
    return [dict(r) for r in _read_iu_reports_cached(str(src))]


@functools.lru_cache(maxsize=4)
def _read_iu_reports_cached(src: str) -> tuple[dict[str, Any], ...]:
    out = []
    for name, data in iter_report_files(src):
        try:
            rec = parse_open_i_xml(data, name)
        except ValueError:
            continue  # a broken XML is skipped; import_iu_xray reports such files
        rec["number"] = _report_number(name)
        out.append(rec)
    out.sort(key=lambda r: r["number"])
    return tuple(out)


def _image_keys(image_id: str) -> list[str]:
    """Names an image may have on disk: the id itself, without the report's '_<n>_' infix (CXR1_1_IM-... ->
    CXR1_IM-...), and without the 'CXR' prefix."""
    short = re.sub(r"^(CXR\d+)_\d+_", r"\1_", image_id)
    return list(dict.fromkeys([image_id, short, image_id.removeprefix("CXR"), short.removeprefix("CXR")]))


def _views() -> dict[str, str]:
    """imageid -> view from torchxrayvision's NLMCXR DICOM metadata (empty when it is not there)."""
    try:
        path = builtin_reports_path().parent / "nlmcxr_dicom_metadata.csv.gz"
    except ImportError_:
        return {}
    if not path.is_file():
        return {}
    meta = pd.read_csv(path, usecols=["imageid", "View Position"], dtype=str, keep_default_na=False)
    return {i: normalize_view(v) for i, v in zip(meta["imageid"], meta["View Position"], strict=True)}


def import_iu_xray(
    src: str | Path = "builtin",
    images: str | Path | None = None,
    seed: int = 0,
    **_: Any,
) -> pd.DataFrame:
    """A manifest from the Open-I reports (`src`: 'builtin', the .tgz, or a folder of XMLs) and optionally the
    NLMCXR image folder (`images`, searched recursively for <image id>.png/.jpg/.dcm)."""
    from retrieval.labels import label_report

    problems: list[str] = []
    reports = []
    for name, data in iter_report_files(src):
        try:
            reports.append(parse_open_i_xml(data, name))
        except ValueError as e:
            problems.append(f"{name}: {e}, skipped")
    if not reports:
        raise ImportError_(f"{src}: no Open-I report XMLs found")
    reports.sort(key=lambda r: _report_number(r["study_id"]))

    by_name: dict[str, Path] = {}
    if images:
        if not Path(images).is_dir():
            raise ImportError_(f"{images}: image folder not found")
        by_name = index_images(images)
    views = _views()
    rows = []
    labels_of: dict[str, list[str]] = {}
    no_text = no_images = missing = 0
    for rep in track(reports, "iu-xray reports", unit="reports"):
        report = report_text(rep)
        if not report:
            no_text += 1
            problems.append(f"{rep['study_id']}: report has no FINDINGS or IMPRESSION text, skipped")
            continue
        if not rep["images"]:
            no_images += 1
            problems.append(f"{rep['study_id']}: report references no image, skipped")
            continue
        if report not in labels_of:  # many reports repeat word for word ("No acute cardiopulmonary ...")
            labels_of[report] = label_report(report)
        labels = labels_of[report]
        for image_id in rep["images"]:
            keys = _image_keys(image_id)
            path = ""
            if images:
                found = next((by_name[k] for k in keys if k in by_name), None)
                if found is None:
                    missing += 1
                    problems.append(f"{rep['study_id']}: image {image_id} not found under {images}, skipped")
                    continue
                path = str(found.resolve())
            rows.append(
                {
                    "image_id": image_id,
                    "study_id": rep["study_id"],
                    "patient_id": rep["study_id"],
                    "image_path": path,
                    "view": next((views[k] for k in keys if k in views), ""),
                    "report": report,
                    "findings": rep["findings"],
                    "impression": rep["impression"],
                    "labels": labels,
                    "indication": rep["indication"],
                    "mesh": rep["mesh"],
                }
            )
    notes = [
        f"{len(reports)} report XMLs read; skipped {no_text} without FINDINGS/IMPRESSION text, {no_images} "
        f"without images" + (f", and {missing} images not found in the image folder" if images else "")
    ]
    if not images:
        notes.append(
            f"no image folder given (--images): image_path is empty for all {len(rows)} images "
            "(`cxr data demo` renders synthetic images for these reports)"
        )
    return finish(rows, "iu-xray", seed=seed, problems=problems, notes=notes)
