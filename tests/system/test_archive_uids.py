"""Results link back to the archive: the DICOM UIDs of the manifest travel through the index into every result row
of `cxr query --json` and of the HTTP API ('' for rows from other sources), generations written before the columns
existed still open, and `cxr serve --archive-url` checks its template (serve/archive_link.py)."""

from __future__ import annotations

import json

import faiss
import numpy as np
import pandas as pd
import pytest
from index_helpers import FakeModel, make_corpus

from cli.main import main
from index import generations, layout
from index.build import BuildOptions, build_index
from index.search import Searcher
from retrieval.data.manifest import DICOM_COLUMNS, read_manifest, write_manifest
from retrieval.errors import UsageError
from serve.archive_link import archive_link, check_archive_url

faiss.omp_set_num_threads(1)
OHIF = "http://pacs.example/ohif/viewer?StudyInstanceUIDs={study_instance_uid}"


def dicom_tags(study: str, image: str) -> dict:
    """The six DICOM columns of one row; the study date stays a string of digits (it must not become a number)."""
    n = int(study[2:])
    return {
        "study_instance_uid": f"1.2.826.0.1.3680043.8.498.{100 + n}",
        "series_instance_uid": f"1.2.826.0.1.3680043.8.498.{100 + n}.1",
        "sop_instance_uid": f"1.2.826.0.1.3680043.8.498.{100 + n}.1.{int(image[3:])}",
        "accession_number": f"ACC{n:05d}",
        "study_date": f"202401{1 + n % 28:02d}",
        "modality": "DX",
    }


@pytest.fixture(scope="module")
def uid_index(tmp_path_factory):
    """An index over a CSV manifest whose even studies carry DICOM UIDs and whose odd studies (PNG-style rows)
    leave the columns empty; returns (index folder, manifest frame)."""
    root = tmp_path_factory.mktemp("uids")
    df = read_manifest(make_corpus(root, n=16, bad=False))
    for col in DICOM_COLUMNS:
        df[col] = ""
    for i, r in df.iterrows():
        if int(r["study_id"][2:]) % 2 == 0:
            for col, v in dicom_tags(r["study_id"], r["image_id"]).items():
                df.at[i, col] = v
    write_manifest(df, root / "manifest.csv")  # through CSV: every cell is read back as text
    build_index(root / "manifest.csv", FakeModel(), root / "idx", options=BuildOptions(workers=0, progress=False))
    return root / "idx", df.set_index("image_id")


def expected(df: pd.DataFrame, image_id: str) -> dict:
    return {col: str(df.loc[image_id, col]) for col in DICOM_COLUMNS}


@pytest.mark.parametrize("target", ["reports", "images"])
def test_cxr_query_json_carries_the_uids_of_each_row(uid_index, monkeypatch, capsys, target):
    idx, df = uid_index
    monkeypatch.setattr("retrieval.models.load_model", lambda name, device=None: FakeModel())
    args = ["query", "--text", "pneumonia", "--index", str(idx), "-k", "6", "--target", target, "--json"]
    args.append("--all-per-patient")  # every row, not each patient's best only
    assert main([*args, "--model", "fake-0"]) == 0
    results = json.loads(capsys.readouterr().out)["results"]
    assert len(results) == 6
    kinds = set()
    for r in results:
        assert {c: r[c] for c in DICOM_COLUMNS} == expected(df, r["image_id"])
        kinds.add(bool(r["study_instance_uid"]))
        if r["study_instance_uid"]:
            assert r["study_date"].isdigit() and len(r["study_date"]) == 8
    assert kinds == {True, False}  # both kinds of rows among the hits: '' is what a non-DICOM row carries


def test_a_generation_written_before_the_columns_opens_with_empty_uids(tmp_path):
    x = np.random.default_rng(0).normal(size=(6, 8)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    images, reports = faiss.IndexFlatIP(8), faiss.IndexFlatIP(8)
    images.add(x)
    reports.add(x)
    meta = pd.DataFrame(
        {
            "row_id": np.arange(6),
            "image_id": [f"i{i}" for i in range(6)],
            "study_id": [f"s{i}" for i in range(6)],
            "patient_id": [f"p{i}" for i in range(6)],
            "image_path": [f"/x/{i}.png" for i in range(6)],
            "view": "PA",
            "report": "clear lungs.",
            "labels": [["No Finding"]] * 6,
            "split": "train",
            "source": "old",
            "has_report": True,
        }
    )[layout.META_COLUMNS]
    info = {"factory": "Flat", "model": {"name": "fake", "fingerprint": "f"}}
    folder = generations.save_index(tmp_path / "old", images, reports, meta, info)
    hits = Searcher(folder).query_vector(x[2], k=3, target="images")
    assert hits["image_id"].iloc[0] == "i2"
    for col in DICOM_COLUMNS:
        assert list(hits[col]) == ["", "", ""]


def test_the_http_api_carries_the_uids_and_the_archive_template(uid_index):
    from fastapi.testclient import TestClient

    from serve.app import create_app
    from serve.service import ServeConfig, ServeService

    idx, df = uid_index
    cfg = ServeConfig(index=idx, workers=1, watch_interval=0, archive_url=f"  {OHIF} ", one_per_patient=False)
    svc = ServeService(cfg, model=FakeModel())
    try:
        with TestClient(create_app(svc)) as client:
            assert client.get("/info").json()["archive_url"] == OHIF  # stripped, checked
            body = {"text": "pneumonia", "k": 6, "target": "images"}
            results = client.post("/search", json=body).json()["results"]
            assert len(results) == 6
            for r in results:
                assert {c: r[c] for c in DICOM_COLUMNS} == expected(df, r["image_id"])
            study = client.get("/studies/st0002").json()
            assert study["study_instance_uid"] == dicom_tags("st0002", "img0004")["study_instance_uid"]
            assert [i["sop_instance_uid"] for i in study["images"]] == [
                dicom_tags("st0002", f"img{j:04d}")["sop_instance_uid"] for j in (4, 5)
            ]
            assert client.get("/studies/st0001").json()["study_instance_uid"] == ""
    finally:
        svc.close()


def test_archive_templates_are_checked_and_filled():
    assert check_archive_url(OHIF) == OHIF
    orthanc = "https://pacs/ui/app/#/filtered-studies?StudyInstanceUID={study_instance_uid}&x={accession_number}"
    assert check_archive_url(orthanc) == orthanc
    for bad, why in (
        ("javascript:alert(1)//{study_instance_uid}", "http"),
        ("http://pacs/viewer?uid={patient_name}", "unknown field"),
        ("http://pacs/viewer", "names no field"),
        ("http://pacs/viewer?uid={study_instance_uid!r}", "plain"),
        ("http://pacs/viewer?uid={study_instance_uid", "expected .}. before end"),
    ):
        with pytest.raises(UsageError, match=why):
            check_archive_url(bad)
    row = {"study_instance_uid": "1.2.3", "accession_number": "A&B 1"}
    assert archive_link(orthanc, row) == orthanc.replace("{study_instance_uid}", "1.2.3").replace(
        "{accession_number}", "A%26B%201"
    )
    assert archive_link(OHIF, {"study_instance_uid": ""}) is None  # a non-DICOM row gets no link
    assert archive_link(orthanc, {"study_instance_uid": "1.2.3"}) is None


def test_cxr_serve_refuses_a_bad_template_in_one_line(uid_index, monkeypatch, capsys):
    monkeypatch.setattr("retrieval.models.load_model", lambda name, device=None: FakeModel())
    idx, _ = uid_index
    code = main(["serve", "--index", str(idx), "--no-vlm", "--archive-url", "ftp://pacs/{study_instance_uid}"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "--archive-url must be an http" in err, err


def test_a_dicom_folder_import_indexes_and_returns_each_files_own_uids(tmp_path, monkeypatch, capsys):
    """Importer -> manifest -> index -> `cxr query --json`: each hit's UIDs and tags are those pydicom reads from
    the hit's own file (the naive reference)."""
    import pydicom
    from dicom_maker import make_radiograph

    from retrieval.data.importers import import_source

    root = tmp_path / "dicom"
    for i, (patient, study, modality) in enumerate([("P1", "S1", "DX"), ("P1", "S1", "DX"), ("P2", "S2", "CR"),
                                                    ("P3", "S3", "DX"), ("P4", "S4", "CR")]):  # fmt: skip
        make_radiograph(root / f"{study}_{i}.dcm", patient, study, modality, seed=i, accession=f"ACC-{study}")
    df = import_source("dicom", root)
    write_manifest(df, tmp_path / "manifest.parquet")
    build_index(tmp_path / "manifest.parquet", FakeModel(), tmp_path / "idx", BuildOptions(workers=0, progress=False))
    monkeypatch.setattr("retrieval.models.load_model", lambda name, device=None: FakeModel())
    query = next(root.glob("S2_*.dcm"))
    args = ["query", str(query), "--index", str(tmp_path / "idx"), "-k", "5", "--target", "images", "--json"]
    args.append("--all-per-patient")
    assert main([*args, "--model", "fake-0"]) == 0
    results = json.loads(capsys.readouterr().out)["results"]
    assert len(results) == 5 and results[0]["image_path"] == str(query.resolve())
    tags = {"study_instance_uid": "StudyInstanceUID", "series_instance_uid": "SeriesInstanceUID",
            "sop_instance_uid": "SOPInstanceUID", "accession_number": "AccessionNumber", "study_date": "StudyDate",
            "modality": "Modality"}  # fmt: skip
    for r in results:
        ds = pydicom.dcmread(r["image_path"], stop_before_pixels=True)
        assert {col: r[col] for col in tags} == {col: str(ds[kw].value) for col, kw in tags.items()}
