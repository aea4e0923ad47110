"""Reports for DICOM rows: from a CSV keyed by AccessionNumber or StudyInstanceUID (`--reports`), or from the SR
documents of the same studies. Shared by the folder and the DICOMweb importer.

The CSV needs a key column (`accession_number` / `AccessionNumber`, or `study_instance_uid` / `StudyInstanceUID`)
and the text (`report`, or `findings` and/or `impression`). With a pseudonymizer the CSV's accession numbers are
pseudonymized the same way as the rows', so the lookup matches and no raw number is kept. A CSV report wins over
an SR report of the same study. Labels come from the report text through the rule labeler.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from retrieval.data.importers.common import read_csv_text
from retrieval.data.pseudonym import Pseudonymizer
from retrieval.errors import ImportError_
from retrieval.study_text import report_text

_ACCESSION = ("accession_number", "AccessionNumber", "accession")
_STUDY = ("study_instance_uid", "StudyInstanceUID", "study_uid")


@dataclass
class Reports:
    """Report texts by accession number and by study UID, with the sections when the CSV had them."""

    by_accession: dict[str, dict] = field(default_factory=dict)
    by_study: dict[str, dict] = field(default_factory=dict)

    def find(self, accession: str, study: str) -> dict | None:
        return (accession and self.by_accession.get(accession)) or self.by_study.get(study)


def _column(df: pd.DataFrame, names: tuple[str, ...]) -> str | None:
    return next((c for c in names if c in df.columns), None)


def read_report_csv(path: str | Path, pseudonymize: Pseudonymizer | None = None) -> Reports:
    """The reports of a CSV keyed by accession number or study UID. Raises ImportError_ for a file it cannot use."""
    path = Path(path)
    if not path.is_file():
        raise ImportError_(f"{path}: report file not found")
    df = read_csv_text(path)
    acc_col, study_col = _column(df, _ACCESSION), _column(df, _STUDY)
    if acc_col is None and study_col is None:
        raise ImportError_(f"{path}: needs an accession_number or study_instance_uid column")
    if not any(c in df.columns for c in ("report", "findings", "impression")):
        raise ImportError_(f"{path}: needs a report column (or findings / impression)")
    out = Reports()
    for rec in df.to_dict("records"):
        entry = {k: str(rec.get(k, "") or "").strip() for k in ("report", "findings", "impression")}
        entry["report"] = report_text(entry)  # the report, else findings + impression
        if not entry["report"]:
            continue
        if acc_col and str(rec[acc_col]).strip():
            key = str(rec[acc_col]).strip()
            out.by_accession[pseudonymize(key, "AccessionNumber") if pseudonymize else key] = entry
        if study_col and str(rec[study_col]).strip():
            out.by_study[str(rec[study_col]).strip()] = entry
    return out


def attach_reports(rows: list[dict], sr_texts: Mapping[str, str], csv: Reports | None) -> list[str]:
    """Fill each row's report (CSV first, then the study's SR text) and labels, in place; returns notes."""
    from retrieval.labels import label_report

    from_csv = from_sr = 0
    for row in rows:
        entry = csv.find(row.get("accession_number", ""), row["study_id"]) if csv else None
        if entry:
            row.update(entry)
            from_csv += 1
        elif sr_texts.get(row["study_id"]):
            row["report"] = sr_texts[row["study_id"]]
            from_sr += 1
        if row.get("report"):
            row["labels"] = label_report(row["report"])
    notes = []
    if rows:
        notes.append(f"reports: {from_csv} images from the CSV, {from_sr} from SR documents, "
                     f"{len(rows) - from_csv - from_sr} without a report")  # fmt: skip
    if from_csv + from_sr:
        notes.append("labels read from the report text by the rule labeler")
    return notes
