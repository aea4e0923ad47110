"""`cxr data import dicom DIR` (retrieval/data/importers/dicom_folder.py) on the files of tests/helpers/dicom_maker.py:
which files are kept, each skip reason, the rows against a plain pydicom reading, reports from SR and CSV,
patient-disjoint splits, and the pseudonyms (HMAC-SHA256 computed here independently)."""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
from pathlib import Path

import numpy as np
import pandas as pd
import pydicom
import pytest
from dicom_maker import make_radiograph, make_test_folder

from cli.main import main
from retrieval.data.image_io import read_image
from retrieval.data.importers import import_source
from retrieval.data.importers.dicom_folder import SKIPPED
from retrieval.data.manifest import read_manifest
from retrieval.errors import ImportError_


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("dicom")
    return root, make_test_folder(root)


def _rel(df: pd.DataFrame, root: Path) -> dict[str, dict]:
    return {Path(p).relative_to(root.resolve()).as_posix(): r for p, r in zip(df["image_path"], df.to_dict("records"))}


def test_keeps_the_radiographs_and_lists_every_other_file_with_its_reason(folder):
    root, expected = folder
    df = import_source("dicom", root)
    kept = _rel(df, root)
    assert sorted(kept) == sorted(name for name, e in expected.items() if e.kept)
    problems = {p.split(": ", 1)[0]: p.split(": ", 1)[1] for p in df.attrs["import_problems"]}
    for name, e in expected.items():
        if e.kept or e.reason == "report":
            assert name not in problems, (name, problems.get(name))
        else:
            assert e.reason in problems[name], (name, problems[name])
    counts = df.attrs[SKIPPED]
    assert counts["not a DICOM file"] == 2 and counts["damaged header"] == 1 and counts["modality CT"] == 1
    assert counts["secondary capture"] == 1 and counts["missing StudyInstanceUID"] == 1
    assert df.attrs["import_notes"][0].startswith(f"kept {len(kept)} radiograph(s); skipped 7 file(s)")


def test_rows_match_a_plain_pydicom_reading(folder):
    root, _ = folder
    df = import_source("dicom", root)
    for rel, row in _rel(df, root).items():
        ds = pydicom.dcmread(root / rel, force=True)  # the reference: the whole file
        assert row["image_id"] == row["sop_instance_uid"] == ds.SOPInstanceUID
        assert row["study_id"] == row["study_instance_uid"] == ds.StudyInstanceUID
        assert row["series_instance_uid"] == ds.SeriesInstanceUID
        assert row["patient_id"] == ds.PatientID and row["accession_number"] == ds.AccessionNumber
        assert row["modality"] == ds.Modality and row["study_date"] == ds.StudyDate
        assert row["view"] == ("LATERAL" if ds.ViewPosition == "LL" else ds.ViewPosition)
        assert read_image(root / rel).shape == (ds.Rows, ds.Columns)
    assert df.groupby("patient_id")["split"].nunique().max() == 1  # patient-disjoint


def test_reports_come_from_the_studies_sr_documents(folder):
    root, _ = folder
    df = import_source("dicom", root)
    s1 = df[df["accession_number"] == "ACC-S1"]
    assert len(s1) == 2 and set(s1["report"]) == {"Heart size normal. No pleural effusion."}
    assert all(labels == ["No Finding"] for labels in s1["labels"])
    assert (df.loc[df["accession_number"] != "ACC-S1", "report"] == "").all()


def test_a_report_csv_keyed_by_accession_or_study_uid_wins_over_sr(folder, tmp_path):
    root, _ = folder
    s3 = pydicom.dcmread(root / "p2/s3/IM0001").StudyInstanceUID
    csv = tmp_path / "reports.csv"
    pd.DataFrame(
        {
            "accession_number": ["ACC-S1", ""],
            "study_instance_uid": ["", s3],
            "findings": ["Right pleural effusion.", "Cardiomegaly."],
            "impression": ["", ""],
        }
    ).to_csv(csv, index=False)
    df = import_source("dicom", root, reports=csv)
    by_acc = df.groupby("accession_number")["report"].first()
    assert by_acc["ACC-S1"] == "Right pleural effusion."
    assert by_acc["ACC-S3"] == "Cardiomegaly."
    assert "Pleural Effusion" in df.loc[df["accession_number"] == "ACC-S1", "labels"].iloc[0]
    with pytest.raises(ImportError_, match="accession_number or study_instance_uid"):
        bad = tmp_path / "bad.csv"
        bad.write_text("id,report\n1,x\n")
        import_source("dicom", root, reports=bad)


def _hmac(key: str, field: str, value: str) -> str:
    return hmac.new(key.encode(), f"{field}\x1f{value}".encode(), hashlib.sha256).hexdigest()


def test_pseudonymize_stores_keyed_hashes_and_logs_no_identifier(folder, tmp_path, caplog):
    root, _ = folder
    out = tmp_path / "m.parquet"
    with caplog.at_level(logging.DEBUG):
        assert main(["data", "import", "dicom", str(root), "--out", str(out), "--pseudonymize", "s3cret"]) == 0
    df = read_manifest(out)
    plain = import_source("dicom", root)
    assert len(df) == len(plain)
    for row, ref in zip(df.to_dict("records"), plain.to_dict("records"), strict=True):
        assert row["patient_id"] == "hmac-" + _hmac("s3cret", "PatientID", ref["patient_id"])[:32]
        assert row["accession_number"] == _hmac("s3cret", "AccessionNumber", ref["accession_number"])[:16]
        assert row["image_id"] == ref["image_id"]
    # the same patient keeps one pseudonym, so the splits stay patient-disjoint
    assert df.groupby("patient_id")["split"].nunique().max() == 1
    assert df["patient_id"].nunique() == plain["patient_id"].nunique()
    data = out.read_bytes()
    for raw in set(plain["accession_number"]):
        assert raw.encode() not in data
    logged = "\n".join(r.getMessage() for r in caplog.records)
    assert "ACC-S" not in logged and "s3cret" not in logged
    assert not any(f"'{p}'" in logged or f" {p} " in logged for p in set(plain["patient_id"]))
    another = import_source("dicom", root, pseudonymize="other-key")
    assert set(another["patient_id"]).isdisjoint(df["patient_id"])


def test_monochrome1_reads_as_the_inverse_of_monochrome2(tmp_path):
    for syntax in ("explicit", "jpeg", "j2k"):
        a = read_image(make_radiograph(tmp_path / f"m2{syntax}.dcm", "P", "S", photometric="MONOCHROME2",
                                       syntax=syntax, seed=3))  # fmt: skip
        b = read_image(make_radiograph(tmp_path / f"m1{syntax}.dcm", "P", "S", photometric="MONOCHROME1",
                                       syntax=syntax, seed=3))  # fmt: skip
        tol = 0.05 if syntax == "jpeg" else 1e-6  # JPEG baseline is lossy: the two encodings differ a little
        assert np.abs(a - b).mean() < tol, syntax


def test_cli_json_summary_and_one_line_errors(folder, tmp_path, capsys):
    root, _ = folder
    out = tmp_path / "m.csv"
    assert main(["data", "import", "dicom", str(root), "--out", str(out), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["images"] == 8 and summary["patients"] == 4 and summary["studies"] == 5
    assert any("secondary capture" in p for p in summary["problems"])
    assert summary["notes"][0].startswith("kept 8 radiograph(s)")
    assert main(["data", "import", "dicom", str(tmp_path / "absent"), "--out", str(out)]) == 1
    err = capsys.readouterr().err.strip()
    assert "not a folder" in err and "Traceback" not in err and len(err.splitlines()) == 1


def test_raw_for_processing_images_are_skipped(tmp_path):
    path = make_radiograph(tmp_path / "raw.dcm", "P1", "S1")
    ds = pydicom.dcmread(path)
    ds.PresentationIntentType = "FOR PROCESSING"
    ds.save_as(path, enforce_file_format=True)
    df = import_source("dicom", tmp_path)
    assert len(df) == 0 and df.attrs["import_problems"] == ["raw.dcm: for processing (raw detector data)"]
