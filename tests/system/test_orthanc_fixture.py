"""The loopback Orthanc fixture itself (tests/helpers/orthanc.py): auth, STOW-RS / QIDO-RS / WADO-RS, its request log,
and that it stops by its PID. The DICOM maker's files (tests/helpers/dicom_maker.py) are what it stores."""

from __future__ import annotations

import os

import pydicom
import pytest
import requests
from dicom_maker import as_archived, make_radiograph, make_test_folder


def test_refuses_requests_without_credentials(orthanc):
    assert requests.get(orthanc.dicomweb_url + "/studies", timeout=10).status_code in (401, 403)
    wrong = requests.get(orthanc.dicomweb_url + "/studies", auth=("cxr-test", "wrong"), timeout=10)
    assert wrong.status_code in (401, 403)


@pytest.mark.parametrize("auth", ["basic", "bearer"])
def test_stow_qido_wado_round_trip(orthanc, tmp_path, auth):
    path = make_radiograph(tmp_path / "a.dcm", "P1", "S1", modality="CR", syntax="j2k", accession="A1")
    client = orthanc.client(auth)
    client.store_instances([pydicom.dcmread(path)])
    found = client.search_for_instances(search_filters={"Modality": "CR"})
    assert len(found) == 1
    sop = pydicom.Dataset.from_json(found[0]).SOPInstanceUID
    original = pydicom.dcmread(path)
    assert sop == original.SOPInstanceUID
    back = client.retrieve_instance(
        original.StudyInstanceUID, original.SeriesInstanceUID, sop, media_types=(("application/dicom", "*"),)
    )
    assert back.file_meta.TransferSyntaxUID == original.file_meta.TransferSyntaxUID
    assert (back.pixel_array == original.pixel_array).all()
    assert ("GET", f"/dicom-web/studies/{original.StudyInstanceUID}/series/{original.SeriesInstanceUID}"
            f"/instances/{sop}") in orthanc.requests()  # fmt: skip


def test_stores_every_made_radiograph_and_stops_by_pid(orthanc, tmp_path):
    expected = make_test_folder(tmp_path / "dicom")
    kept = [as_archived(tmp_path / "dicom" / name) for name, e in expected.items() if e.kept]
    orthanc.client().store_instances(kept)
    assert len(orthanc.get_json("/instances")) == len(kept)
    pid = orthanc.process.pid
    orthanc.stop()
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
