"""A folder of DICOM files -> a manifest (`cxr data import dicom DIR`), read by the files' own tags.

Every file under the folder is looked at, whatever its name: a file with the 'DICM' preamble is DICOM; a file
without it is tried only when its name ends in .dcm / .dicom / .dic (an old raw dataset). Headers are read without
the pixels (importers/dicom_header.py). Projection radiographs (CR, DX) become rows; SR documents give their study's
report; everything else is skipped and listed with its reason (not DICOM, damaged header, missing UID, modality,
secondary capture). A bad file never stops the walk. Reports may come from a CSV instead (`reports=`), splits are
patient-disjoint (common.finish). Nothing identifying is logged at INFO: file paths and counts only.
"""

from __future__ import annotations

import logging
import os
from collections import Counter
from pathlib import Path
from typing import Any

import pandas as pd

from retrieval.data.image_io import DICOM_SUFFIXES, is_dicom
from retrieval.data.importers.common import finish
from retrieval.data.importers.dicom_header import HeaderError, InstanceScan, read_header
from retrieval.data.importers.dicom_reports import attach_reports, read_report_csv
from retrieval.data.pseudonym import Pseudonymizer, key_from
from retrieval.errors import ImportError_

log = logging.getLogger(__name__)
SKIPPED = "import_skipped"  # df.attrs: {reason kind: count}


def walk_files(folder: Path) -> list[Path]:
    """Every regular file under `folder`, sorted, hidden folders left out."""
    found = []
    for dirpath, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        found.extend(Path(dirpath) / name for name in sorted(files) if not name.startswith("."))
    return found


def read_instance(path: Path) -> Any:
    """The header of one file, or HeaderError('not a DICOM file' / 'damaged header: ...')."""
    if is_dicom(path):
        return read_header(path)
    if path.suffix.lower() in DICOM_SUFFIXES:
        return read_header(path, force=True)
    raise HeaderError("not a DICOM file")


def reason_kind(reason: str) -> str:
    """The reason without its details ('damaged header: EOF ...' -> 'damaged header'), for the summary counts."""
    head = reason.split(":", 1)[0]
    return " ".join(head.split()[:2]) if head.startswith(("invalid", "missing")) else head


def skipped_note(skipped: Counter, kept: int) -> str:
    """One line: how many files were kept and skipped, by reason."""
    parts = ", ".join(f"{n} {kind}" for kind, n in sorted(skipped.items(), key=lambda kv: (-kv[1], kv[0])))
    return f"kept {kept} radiograph(s); skipped {sum(skipped.values())} file(s)" + (f": {parts}" if parts else "")


def scan_folder(folder: Path, pseudonymize: Pseudonymizer | None) -> tuple[list[dict], dict[str, str], list[str]]:
    """Rows of the kept radiographs, SR report texts by study UID, and the skipped files ('path: reason')."""
    scan = InstanceScan("dicom", pseudonymize)
    for path in walk_files(folder):
        rel = path.relative_to(folder).as_posix()
        try:
            ds = read_instance(path)
        except HeaderError as e:
            scan.skip(rel, e.reason)
            continue
        except OSError as e:
            scan.skip(rel, f"cannot read: {e.strerror or e}")
            continue
        kind = scan.take(rel, ds, path)
        if kind in ("report", "empty report"):
            scan.skip(rel, f"report (SR): {'text used' if kind == 'report' else 'no text or study UID'}")
    return scan.rows, scan.sr_texts, scan.skipped


def import_dicom_folder(
    src: str | Path,
    reports: str | Path | None = None,
    seed: int = 0,
    pseudonymize: str | Pseudonymizer | None = None,
    **_: Any,
) -> pd.DataFrame:
    """A manifest of the CR/DX radiographs under `src`; the skipped files and why in attrs['import_problems'],
    counts by reason in attrs['import_skipped'] and one summary line among the notes."""
    folder = Path(src)
    if not folder.is_dir():
        raise ImportError_(f"{folder}: not a folder")
    pseudo = pseudonymize if isinstance(pseudonymize, Pseudonymizer) else key_from(pseudonymize)
    csv = read_report_csv(reports, pseudo) if reports else None
    rows, sr_texts, skipped = scan_folder(folder, pseudo)
    notes = attach_reports(rows, sr_texts, csv)
    problems = [s for s in skipped if ": report (SR): text used" not in s]
    counts = Counter(reason_kind(s.split(": ", 1)[1]) for s in skipped)
    notes.insert(0, skipped_note(counts, len(rows)))
    if pseudo is not None:
        notes.append("PatientID and AccessionNumber stored as keyed pseudonyms (HMAC-SHA256)")
    log.info("dicom import of %s: %s", folder, notes[0])
    df = finish(rows, "dicom", seed=seed, problems=problems, notes=notes)
    df.attrs[SKIPPED] = dict(counts)
    return df
