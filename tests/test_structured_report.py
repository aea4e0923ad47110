"""The drafted report as a DICOM Comprehensive SR (generation/structured_report.py): written, read back by plain
pydicom with the same text, codes and coordinates; valid for dciodvfy (Debian's dicom3tools); a PNG source refused;
sent with STOW-RS to a loopback DICOMweb endpoint with bearer and basic auth; `cxr generate --sr` end to end."""

from __future__ import annotations

import base64
import json
import shutil
import subprocess
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pydicom
import pytest
from gen_synth import SynthRetrievalModel, make_index, make_manifest, one_thread  # noqa: F401 (an autouse fixture)
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sr._concepts_dict import concepts
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from generation.structured_report import FINDING_CODES, LOCAL_SCHEME, build_sr, read_source, store_sr, write_sr
from retrieval.data.importers.dicomweb import Auth
from retrieval.errors import CXRError, UsageError
from retrieval.labels import LABELS

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
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = DX_FOR_PRESENTATION, generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = DX_FOR_PRESENTATION, meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.PatientID, ds.PatientName, ds.PatientBirthDate, ds.PatientSex = "PAT-1", "Test^Patient", "19700101", "F"
    ds.StudyDate, ds.StudyTime, ds.AccessionNumber, ds.StudyID = "20240102", "101010", "ACC0001", "1"
    ds.ReferringPhysicianName = ""
    ds.Modality = "DX"
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.PixelData = pixels.astype(np.uint8).tobytes()
    ds.save_as(path, enforce_file_format=True)
    return path


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


def test_every_label_has_a_code_and_the_standard_ones_are_in_pydicoms_dictionary():
    assert set(FINDING_CODES) == set(LABELS)
    for label, (value, scheme, meaning) in FINDING_CODES.items():
        if scheme == LOCAL_SCHEME:
            assert 0 < len(value) <= 16, value  # SH
            continue
        known = {(v, m) for by_code in concepts[scheme].values() for v, (m, _) in by_code.items()}
        assert (value, meaning) in known, (label, value, scheme, meaning)


def expected_polyline(box: dict) -> np.ndarray:
    """The naive reference: the box's corners scaled by the image's columns and rows, closed."""
    x1, y1, x2, y2 = box["x1"] * COLUMNS, box["y1"] * ROWS, box["x2"] * COLUMNS, box["y2"] * ROWS
    return np.array([[x1, y1], [x2, y1], [x2, y2], [x1, y2], [x1, y1]])


def test_offline_round_trip_same_text_codes_coordinates_and_draft_flags(tmp_path):
    src = write_source(tmp_path / "src.dcm")
    out = tmp_path / "draft.dcm"
    write_sr(DRAFT, src, out)
    got = read_back(out)
    ds, source = got["ds"], pydicom.dcmread(src)
    # an unverified machine draft, in the source's study, naming this software
    assert (ds.CompletionFlag, ds.VerificationFlag, ds.PreliminaryFlag) == ("PARTIAL", "UNVERIFIED", "PRELIMINARY")
    assert ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.88.33" and ds.Modality == "SR"
    assert ds.Manufacturer == "cxr-retrieval" and ds.SoftwareVersions
    for key in ("StudyInstanceUID", "PatientID", "PatientName", "AccessionNumber", "StudyDate"):
        assert ds[key].value == source[key].value, key
    assert ds.SeriesInstanceUID != source.SeriesInstanceUID
    evidence = ds.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence[0].ReferencedSOPSequence[0]
    assert evidence.ReferencedSOPInstanceUID == source.SOPInstanceUID
    assert [s.CodingSchemeDesignator for s in ds.CodingSchemeIdentificationSequence] == [LOCAL_SCHEME]
    observer = {it.ConceptNameCodeSequence[0].CodeMeaning: it for _, it in walk(ds.ContentSequence)}
    assert observer["Observer Type"].ConceptCodeSequence[0].CodeMeaning == "Device"
    assert observer["Device Observer Name"].TextValue == "cxr-retrieval"
    # the text word for word, the findings coded, every box on the source image in pixel coordinates
    assert got["text"] == [DRAFT["text"]]
    effusion, atelectasis = ("60046008", "SCT"), FINDING_CODES["Atelectasis"][:2]
    assert set(got["findings"]) == {
        effusion,
        atelectasis,
        (got_local := _nodule_code(got)),
    }
    assert got_local[1] == LOCAL_SCHEME and got["findings"][atelectasis] == []
    for regions, boxes in (
        (got["findings"][effusion], DRAFT["boxes"][:2]),
        (got["findings"][got_local], DRAFT["boxes"][2:]),
    ):
        assert len(regions) == len(boxes)
        for (kind, points, ref), box in zip(regions, boxes, strict=True):
            assert kind == "POLYLINE" and ref == source.SOPInstanceUID
            np.testing.assert_allclose(points, expected_polyline(box), atol=1e-4)
    assert got["exemplars"] == [("s1", DRAFT["exemplars"][0]["study_instance_uid"]), ("s2", "")]


def _nodule_code(got: dict) -> tuple[str, str]:
    return next(k for k in got["findings"] if k[1] == LOCAL_SCHEME and k != FINDING_CODES["Atelectasis"][:2])


@pytest.mark.parametrize("drop", [("PatientBirthDate", "PatientSex", "StudyTime", "ReferringPhysicianName", "StudyID"),
                                  ("PatientName", "AccessionNumber", "StudyDate")])  # fmt: skip
def test_a_source_without_optional_patient_and_study_attributes_gets_them_empty(tmp_path, drop):
    """An archive's image often lacks some (a pseudonymised copy has no birth date): the SR carries them empty
    (type 2), keeps the ones it has, and dciodvfy (where installed) still finds no error."""
    src = write_source(tmp_path / "src.dcm")
    ds = pydicom.dcmread(src)
    for keyword in drop:
        delattr(ds, keyword)
    ds.save_as(src)
    out = tmp_path / "draft.dcm"
    write_sr(DRAFT, src, out)
    got = pydicom.dcmread(out)
    assert all(got[k].value in ("", None) for k in drop)
    assert got.PatientID == "PAT-1" and got.StudyInstanceUID == ds.StudyInstanceUID
    if shutil.which("dciodvfy"):
        run = subprocess.run(["dciodvfy", str(out)], capture_output=True, text=True, timeout=60)
        assert not [ln for ln in (run.stdout + run.stderr).splitlines() if ln.startswith("Error")]


def test_a_png_or_a_dicom_without_uids_is_refused_in_one_line(tmp_path):
    from PIL import Image

    png = tmp_path / "x.png"
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(png)
    with pytest.raises(UsageError, match="needs a DICOM source image") as e:
        write_sr(DRAFT, png, tmp_path / "out.dcm")
    assert "\n" not in str(e.value) and not (tmp_path / "out.dcm").exists()
    bare = write_source(tmp_path / "bare.dcm")
    ds = pydicom.dcmread(bare)
    del ds.StudyInstanceUID
    ds.save_as(bare)
    with pytest.raises(UsageError, match="StudyInstanceUID"):
        read_source(bare)


@pytest.mark.skipif(
    shutil.which("dciodvfy") is None,
    reason="dciodvfy not found: install Debian's dicom3tools (apt-get install dicom3tools; `make orthanc` installs it)",
)
def test_dciodvfy_finds_no_error(tmp_path):
    """dicom3tools' IOD checker: no error line; its warnings are listed (it does not know the private 99CXR
    scheme, which CodingSchemeIdentificationSequence declares)."""
    out = tmp_path / "draft.dcm"
    write_sr(DRAFT, write_source(tmp_path / "src.dcm"), out)
    run = subprocess.run(["dciodvfy", str(out)], capture_output=True, text=True, timeout=60)
    lines = (run.stdout + run.stderr).splitlines()
    errors = [ln for ln in lines if ln.startswith("Error")]
    warnings = sorted(set(ln for ln in lines if ln.startswith("Warning")))
    print("dciodvfy warnings:", *warnings, sep="\n  ")
    assert lines and lines[0].strip() == "ComprehensiveSR", lines[:3]
    assert errors == [], errors
    assert all("99CXR" in w for w in warnings), warnings  # the only warning seen: the private coding scheme


class _StowHandler(BaseHTTPRequestHandler):
    """A loopback STOW-RS endpoint: records what arrives (path, auth header, body) and answers 200 or 401."""

    received: list = []
    want_auth: str | None = None

    def do_POST(self):  # noqa: N802 (http.server's name)
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        auth = self.headers.get("Authorization")
        self.received.append((self.path, auth, self.headers.get("Content-Type"), body))
        if self.want_auth is not None and auth != self.want_auth:
            self.send_response(401)
            self.end_headers()
            return
        payload = json.dumps({}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/dicom+json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, *args):
        pass


@pytest.fixture
def stow():
    _StowHandler.received = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), _StowHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server, f"http://127.0.0.1:{server.server_port}/dicom-web"
    server.shutdown()
    server.server_close()


def test_stow_rs_sends_the_sr_with_bearer_or_basic_auth(tmp_path, stow):
    server, url = stow
    sr = build_sr(DRAFT, read_source(write_source(tmp_path / "src.dcm")))
    _StowHandler.want_auth = "Bearer s3cret"
    store_sr(sr, url, Auth(token="s3cret"))
    path, auth, ctype, body = _StowHandler.received[-1]
    assert path == "/dicom-web/studies" and auth == "Bearer s3cret"
    assert ctype.startswith("multipart/related") and "application/dicom" in ctype
    assert str(sr.SOPInstanceUID).encode() in body and DRAFT["text"].encode() in body
    _StowHandler.want_auth = "Basic " + base64.b64encode(b"alice:pw").decode()
    store_sr(sr, url, Auth(user="alice", password="pw"))
    assert _StowHandler.received[-1][1] == _StowHandler.want_auth
    with pytest.raises(CXRError, match="HTTP 401"):
        store_sr(sr, url, Auth(token="wrong"))
    server.shutdown()
    with pytest.raises(CXRError, match="STOW-RS"):
        store_sr(sr, "http://127.0.0.1:9/dicom-web", Auth(token="x"))  # nothing listens on the discard port


TINY = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 2}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny VLM (box head and finding ridge fitted at the end) over synthetic studies whose index rows carry
    Study Instance UIDs; and a DICOM source made from one of the test images."""
    from PIL import Image

    from generation.train import VLMTrainConfig, train_vlm

    root = tmp_path_factory.mktemp("sr")
    df = make_manifest(root, n=18)
    df["study_instance_uid"] = [f"1.2.826.0.1.3680043.8.498.{i + 1}" for i in range(len(df))]
    idx = make_index(df, root / "index")
    cfg = VLMTrainConfig(
        encoders=["patch:1"],
        steps=20,
        batch_size=8,
        lm_overrides=TINY,
        rag_k=2,
        visual_grid=4,
        lr=3e-3,
        checkpoint_every=1000,
    )
    train_vlm(df, root / "vlm", cfg, index_dir=idx, progress=False)
    pixels = np.asarray(Image.open(root / df.iloc[3]["image_path"]).convert("L"))
    return root, df, idx, root / "vlm", write_source(root / "query.dcm", pixels)


def test_draft_findings_come_from_the_head_else_the_text_and_say_no_finding_when_none():
    from generation.draft import draft_findings

    box = [{"label": "Nodule", "x1": 0.1, "y1": 0.1, "x2": 0.2, "y2": 0.2}]
    assert draft_findings({"head_findings": ["Edema"], "text": "large pneumothorax."}, []) == ["Edema"]
    assert draft_findings({"text": "large right pneumothorax. no effusion."}, []) == ["Pneumothorax"]
    assert draft_findings({"head_findings": [], "text": "large pneumothorax."}, []) == ["No Finding"]
    assert draft_findings({"text": "the lungs are clear."}, []) == ["No Finding"]
    assert draft_findings({"text": "the lungs are clear."}, box) == []  # the box names its own finding


def test_draft_for_image_holds_what_the_sr_needs(trained):
    from generation.draft import draft_for_image
    from generation.generate import Generator

    root, df, idx, vlm, src = trained
    gen = Generator(vlm, idx, retrieval_model=SynthRetrievalModel(), device="cpu")
    draft = draft_for_image(src, idx, vlm, k=2, generator=gen)
    assert draft["task"] == "report" and draft["text"]
    assert set(draft["findings"]) <= set(LABELS) and isinstance(draft["boxes"], list)
    by_study = dict(zip(df["study_id"], df["study_instance_uid"], strict=True))
    assert len(draft["exemplars"]) == 2
    for e in draft["exemplars"]:
        assert e["study_instance_uid"] == by_study[e["study_id"]]


def test_an_indexed_study_arriving_under_another_path_is_not_its_own_exemplar(trained, tmp_path):
    """A DICOM of an indexed study (same StudyInstanceUID, another path: an export, a cache) never retrieves its own
    study or patient, as an indexed file does."""
    from generation.draft import draft_for_image
    from generation.generate import Generator

    root, df, idx, vlm, _ = trained
    gen = Generator(vlm, idx, retrieval_model=SynthRetrievalModel(), device="cpu")
    row = df.iloc[4]
    src = write_source(tmp_path / "export.dcm", np.asarray(Image.open(root / row["image_path"]).convert("L")))
    ds = pydicom.dcmread(src)
    ds.StudyInstanceUID = row["study_instance_uid"]
    ds.save_as(src)
    k = len(df) - 1
    studies = [e["study_id"] for e in draft_for_image(src, idx, vlm, k=k, generator=gen)["exemplars"]]
    own = set(df.loc[df["patient_id"] == row["patient_id"], "study_id"])
    assert len(studies) == len(set(df["study_id"]) - own) and not own & set(studies)
    ds.StudyInstanceUID = generate_uid()  # an unknown study: every indexed study may come back
    ds.save_as(src)
    assert len(draft_for_image(src, idx, vlm, k=k, generator=gen)["exemplars"]) == k


def test_cli_generate_writes_the_sr_and_refuses_a_png(trained, tmp_path, capsys):
    from cli.main import main

    root, df, idx, vlm, src = trained
    out = tmp_path / "draft.dcm"
    assert main(["generate", str(src), "--vlm", str(vlm), "-k", "0", "--sr", str(out), "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    got = read_back(out)
    assert got["text"] == [res["text"]] and res["sr"]["sop_instance_uid"] == got["ds"].SOPInstanceUID
    codes = {FINDING_CODES[f][:2] for f in res["findings"]}
    assert codes <= set(got["findings"])
    n_regions = sum(len(r) for r in got["findings"].values())
    assert n_regions == len(res["boxes"])
    png = root / df.iloc[3]["image_path"]
    assert main(["generate", str(png), "--vlm", str(vlm), "-k", "0", "--sr", str(tmp_path / "x.dcm")]) == 2
    err = capsys.readouterr().err.strip()
    assert "needs a DICOM source image" in err and len(err.splitlines()) == 1
    assert main(["generate", str(src), "--vlm", str(vlm), "-k", "0", "--task", "vqa", "--sr", str(out)]) == 2


def test_round_trip_through_orthanc_stow_qido_wado(orthanc, tmp_path):
    """Written, stored with STOW-RS (bearer token) in a real Orthanc beside its source image, found by QIDO-RS,
    fetched by WADO-RS and read back by plain pydicom with the same text, codes and coordinates."""
    src = write_source(tmp_path / "src.dcm", np.full((ROWS, COLUMNS), 90, np.uint8))
    client = orthanc.client("basic")
    client.store_instances([pydicom.dcmread(src)])
    sr = write_sr(DRAFT, src, tmp_path / "draft.dcm")
    store_sr(sr, orthanc.dicomweb_url, Auth(token=orthanc.token))
    found = client.search_for_instances(study_instance_uid=sr.StudyInstanceUID, search_filters={"Modality": "SR"})
    assert [f["00080018"]["Value"][0] for f in found] == [sr.SOPInstanceUID]
    studies = client.search_for_instances(study_instance_uid=sr.StudyInstanceUID)
    assert len(studies) == 2  # the radiograph and its draft, in one study
    fetched = client.retrieve_instance(sr.StudyInstanceUID, sr.SeriesInstanceUID, sr.SOPInstanceUID)
    fetched.save_as(tmp_path / "fetched.dcm", enforce_file_format=True)
    local, remote = read_back(tmp_path / "draft.dcm"), read_back(tmp_path / "fetched.dcm")
    assert remote["text"] == [DRAFT["text"]] and remote["exemplars"] == local["exemplars"]
    assert set(remote["findings"]) == set(local["findings"])
    for code, regions in local["findings"].items():
        assert len(remote["findings"][code]) == len(regions)
        for (kind, points, ref), (kind2, points2, ref2) in zip(regions, remote["findings"][code], strict=True):
            assert (kind, ref) == (kind2, ref2)
            np.testing.assert_array_equal(points, points2)
    assert (remote["ds"].VerificationFlag, remote["ds"].CompletionFlag) == ("UNVERIFIED", "PARTIAL")
    with pytest.raises(CXRError, match="HTTP 40"):
        store_sr(sr, orthanc.dicomweb_url, Auth(token="wrong"))
