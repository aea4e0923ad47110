"""The drafted SR leaves for an archive by STOW-RS (generation/writing/structured_report.py `store_sr`): to a loopback
endpoint that checks bearer and basic auth, and through a real Orthanc (tests/helpers/orthanc.py): stored beside its
source image, found by QIDO-RS, fetched by WADO-RS, read back by plain pydicom with the same text, codes
and coordinates."""

from __future__ import annotations

import base64
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pydicom
import pytest
from sr_helpers import COLUMNS, DRAFT, ROWS, read_back, write_source

from generation.writing.structured_report import build_sr, read_source, store_sr, write_sr
from retrieval.data.importers.dicomweb import Auth
from retrieval.errors import CXRError


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
