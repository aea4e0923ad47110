"""The drafted report as a DICOM Comprehensive SR (generation/writing/structured_report.py): written, read back by plain
pydicom with the same text, codes and coordinates; valid for dciodvfy (Debian's dicom3tools); a PNG source refused;
the draft it is made of (generation/writing/draft.py); `cxr generate --sr` end to end. STOW-RS:
tests/generation/test_sr_store.py."""

from __future__ import annotations

import json
import shutil
import subprocess

import numpy as np
import pydicom
import pytest
from gen_synth import (
    SynthRetrievalModel,
    make_index,
    make_manifest,
    one_thread,  # noqa: F401 (an autouse fixture)
    tiny_vlm_config,
)
from PIL import Image
from pydicom.sr._concepts_dict import concepts
from pydicom.uid import generate_uid
from sr_helpers import DRAFT, expected_polyline, read_back, walk, write_source

from generation.writing.structured_report import FINDING_CODES, LOCAL_SCHEME, read_source, write_sr
from retrieval.errors import UsageError
from retrieval.labels import LABELS


def test_every_label_has_a_code_and_the_standard_ones_are_in_pydicoms_dictionary():
    assert set(FINDING_CODES) == set(LABELS)
    for label, (value, scheme, meaning) in FINDING_CODES.items():
        if scheme == LOCAL_SCHEME:
            assert 0 < len(value) <= 16, value  # SH
            continue
        known = {(v, m) for by_code in concepts[scheme].values() for v, (m, _) in by_code.items()}
        assert (value, meaning) in known, (label, value, scheme, meaning)


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


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny VLM (box head and finding ridge fitted at the end) over synthetic studies whose index rows carry
    Study Instance UIDs; and a DICOM source made from one of the test images."""
    from PIL import Image

    from generation.model.language_model import DEFAULT_LM
    from generation.training.train import train_vlm

    root = tmp_path_factory.mktemp("sr")
    df = make_manifest(root, n=18)
    df["study_instance_uid"] = [f"1.2.826.0.1.3680043.8.498.{i + 1}" for i in range(len(df))]
    idx = make_index(df, root / "index")
    cfg = tiny_vlm_config(20, lm_path=DEFAULT_LM)  # the config's default LM, SmolLM2 (lm_overrides unused)
    train_vlm(df, root / "vlm", cfg, index_dir=idx, progress=False)
    pixels = np.asarray(Image.open(root / df.iloc[3]["image_path"]).convert("L"))
    return root, df, idx, root / "vlm", write_source(root / "query.dcm", pixels)


def test_draft_findings_come_from_the_head_else_the_text_and_say_no_finding_when_none():
    from generation.writing.draft import draft_findings

    box = [{"label": "Nodule", "x1": 0.1, "y1": 0.1, "x2": 0.2, "y2": 0.2}]
    assert draft_findings({"head_findings": ["Edema"], "text": "large pneumothorax."}, []) == ["Edema"]
    assert draft_findings({"text": "large right pneumothorax. no effusion."}, []) == ["Pneumothorax"]
    assert draft_findings({"head_findings": [], "text": "large pneumothorax."}, []) == ["No Finding"]
    assert draft_findings({"text": "the lungs are clear."}, []) == ["No Finding"]
    assert draft_findings({"text": "the lungs are clear."}, box) == []  # the box names its own finding


def test_draft_for_image_holds_what_the_sr_needs(trained):
    from generation.writing.draft import draft_for_image
    from generation.writing.generate import Generator

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
    from generation.writing.draft import draft_for_image
    from generation.writing.generate import Generator

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
