"""`cxr data import dicomweb` and `cxr index sync` against a real loopback Orthanc (tests/helpers/orthanc.py), fed by
STOW-RS with the files of tests/helpers/dicom_maker.py: the same rows and bit-identical pixels as the folder import,
skip reasons, auth (basic, bearer, refused), a SIGKILL mid-import resumed with nothing fetched twice (counted on the
server), and a sync that adds exactly the new uploads, then nothing."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pydicom
import pytest
from dicom_maker import as_archived, make_radiograph, make_secondary_capture, make_test_folder
from index_helpers import FakeModel
from orthanc import find_orthanc, start_orthanc
from repo_paths import REPO

from cli.main import main
from index import store
from index.build import BuildOptions, build_index
from index.dicomweb_sync import SYNC_FILE, sync_index
from retrieval.data.image_io import read_image
from retrieval.data.importers import import_source
from retrieval.data.importers.dicom_cache import MAP_FILE
from retrieval.errors import ImportError_

COMPARED = ["image_id", "study_id", "patient_id", "view", "report", "labels", "split", "study_instance_uid",
            "series_instance_uid", "sop_instance_uid", "accession_number", "study_date", "modality"]  # fmt: skip


def upload(orthanc, paths) -> None:
    orthanc.client().store_instances([as_archived(p) for p in paths])


def wado_fetches(orthanc) -> list[str]:
    """SOP UIDs of the WADO-RS instance fetches the server admitted, in order (one per fetch)."""
    out = []
    for method, uri in orthanc.requests():
        parts = uri.strip("/").split("/")
        if method == "GET" and len(parts) == 7 and parts[0] == "dicom-web" and parts[5] == "instances":
            out.append(parts[6])
    return out


def web_options(orthanc, **extra) -> dict:
    return {"user": orthanc.user, "password": orthanc.password, "progress": False, **extra}


def test_dicomweb_import_gives_the_folder_rows_and_bit_identical_pixels(orthanc, tmp_path):
    root = tmp_path / "dicom"
    expected = make_test_folder(root)
    # a secondary capture that claims to be DX: QIDO finds it, both importers must skip it
    sc = make_secondary_capture(root / "p7/sc_dx.dcm", "P7", "S9", seed=5)
    ds = pydicom.dcmread(sc)
    ds.Modality = "DX"
    ds.save_as(sc, enforce_file_format=True)
    sent = [n for n, e in expected.items() if e.kept or e.reason in ("report", "modality CT", "secondary capture")]
    upload(orthanc, [root / n for n in sent] + [sc])
    folder = import_source("dicom", root, pseudonymize="k1")
    web = import_source("dicomweb", orthanc.dicomweb_url, cache=tmp_path / "cache", pseudonymize="k1",
                        workers=3, **web_options(orthanc))  # fmt: skip
    assert len(web) == len(folder) == sum(e.kept for e in expected.values())
    a = folder.sort_values("image_id").reset_index(drop=True)
    b = web.sort_values("image_id").reset_index(drop=True)
    assert a[COMPARED].equals(b[COMPARED])
    assert (b["report"] != "").sum() == 2 and b["patient_id"].str.startswith("hmac-").all()
    for path_a, path_b in zip(a["image_path"], b["image_path"], strict=True):
        assert Path(path_b).is_relative_to(tmp_path / "cache")
        pix_a, pix_b = read_image(path_a), read_image(path_b)
        assert pix_a.dtype == pix_b.dtype and np.array_equal(pix_a, pix_b), path_a
    assert any("sc_dx.dcm: secondary capture" in p for p in folder.attrs["import_problems"])
    assert sum("secondary capture" in p for p in web.attrs["import_problems"]) == 1
    # the cache holds pseudonyms, not the archive's identifiers
    for path in b["image_path"]:
        cached = pydicom.dcmread(path, stop_before_pixels=True)
        assert cached.PatientID.startswith("hmac-") and "PatientName" not in cached
        assert not cached.AccessionNumber.startswith("ACC-")


def test_auth_basic_bearer_and_refused(orthanc, tmp_path, caplog, capsys, monkeypatch):
    upload(orthanc, [make_radiograph(tmp_path / "a.dcm", "P1", "S1", accession="A1")])
    with caplog.at_level(logging.DEBUG):
        df = import_source("dicomweb", orthanc.dicomweb_url, cache=tmp_path / "c1", token=orthanc.token,
                           progress=False)  # fmt: skip
        assert len(df) == 1
        with pytest.raises(ImportError_, match=r"HTTP 40[13]"):
            import_source("dicomweb", orthanc.dicomweb_url, cache=tmp_path / "c2", user=orthanc.user,
                          password="wrong-password", progress=False)  # fmt: skip
    monkeypatch.setenv("CXR_DICOMWEB_USER", orthanc.user)
    monkeypatch.setenv("CXR_DICOMWEB_PASSWORD", orthanc.password)
    out = tmp_path / "m.parquet"
    assert main(["data", "import", "dicomweb", orthanc.dicomweb_url, "--out", str(out), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["images"] == 1
    assert (tmp_path / "dicom-cache" / MAP_FILE).is_file()  # the default cache: beside the manifest
    monkeypatch.setenv("CXR_DICOMWEB_PASSWORD", "wrong-password")
    assert main(["data", "import", "dicomweb", orthanc.dicomweb_url, "--out", str(out)]) == 1
    captured = capsys.readouterr()
    assert "HTTP 40" in captured.err and "Traceback" not in captured.err
    everything = captured.out + captured.err + "\n".join(r.getMessage() for r in caplog.records)
    for secret in (orthanc.token, orthanc.password, "wrong-password"):
        assert secret not in everything


KILL_SCRIPT = """
import sys
sys.path.insert(0, {repo!r})
from cli.main import main
sys.exit(main(["data", "import", "dicomweb", {url!r}, "--out", {out!r}, "--cache", {cache!r}, "--fetch-workers", "1"]))
"""


def test_a_kill_mid_import_resumes_without_fetching_twice(tmp_path):
    binary, _, why = find_orthanc()
    if binary is None:
        pytest.skip(why)
    server = start_orthanc(tmp_path / "orthanc", delay=0.03)  # a slow archive, so the kill lands mid-fetch
    try:
        n = 16
        upload(server, [make_radiograph(tmp_path / f"in/{i}.dcm", f"P{i % 5}", f"S{i}", size=32, seed=i)
                        for i in range(n)])  # fmt: skip
        cache, out = tmp_path / "cache", tmp_path / "m.parquet"
        code = KILL_SCRIPT.format(repo=str(REPO), url=server.dicomweb_url, out=str(out), cache=str(cache))
        env = dict(os.environ, CXR_DICOMWEB_USER=server.user, CXR_DICOMWEB_PASSWORD=server.password)
        proc = subprocess.Popen([sys.executable, "-c", code], env=env, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None:
            if (cache / MAP_FILE).is_file() and len((cache / MAP_FILE).read_text().splitlines()) >= 4:
                break
            time.sleep(0.005)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        done_before = {json.loads(x)["sop"] for x in (cache / MAP_FILE).read_text().splitlines() if x.endswith("}")}
        assert 4 <= len(done_before) < n, "the kill did not land mid-import"
        df = import_source("dicomweb", server.dicomweb_url, cache=cache, workers=2, **web_options(server))
        fetches = wado_fetches(server)
    finally:
        server.stop(kill=True)
    assert len(df) == n and df.attrs["fetched"] == n - len(done_before)
    assert all(fetches.count(sop) == 1 for sop in done_before)  # what was cached is never fetched again
    assert set(fetches) == set(df["image_id"])
    assert len(fetches) <= n + 1  # at most the one fetch in flight at the kill (one worker) is repeated


def test_sync_adds_exactly_the_new_uploads_and_then_nothing(orthanc, tmp_path):
    first = [make_radiograph(tmp_path / f"a/{i}.dcm", f"P{i}", f"S{i}", size=32, seed=i) for i in range(5)]
    upload(orthanc, first)
    cache = tmp_path / "cache"
    opts = BuildOptions(batch_size=4, workers=0, shard_rows=8, progress=False)
    manifest = import_source("dicomweb", orthanc.dicomweb_url, cache=cache, **web_options(orthanc))
    build_index(manifest, FakeModel(), tmp_path / "idx", options=opts)
    later = [make_radiograph(tmp_path / f"b/{i}.dcm", f"P{i}", f"T{i}", size=32, seed=10 + i) for i in range(3)]
    upload(orthanc, later)
    web = web_options(orthanc)
    web.pop("progress")
    result = sync_index(orthanc.dicomweb_url, tmp_path / "idx", FakeModel(), cache, opts, web)
    new_ids = {pydicom.dcmread(p).SOPInstanceUID for p in later}
    assert (result.found, result.new, result.added) == (8, 3, 3)
    meta = store.open_index(tmp_path / "idx", FakeModel()).meta
    assert set(meta["image_id"]) == set(manifest["image_id"]) | new_ids and len(meta) == 8
    generation = store.resolve(tmp_path / "idx").name
    fetched_before = len(wado_fetches(orthanc))
    again = sync_index(orthanc.dicomweb_url, tmp_path / "idx", FakeModel(), cache, opts, web)
    assert (again.found, again.new, again.added, again.build) == (8, 0, 0, None)
    assert store.resolve(tmp_path / "idx").name == generation  # nothing committed
    assert len(wado_fetches(orthanc)) == fetched_before  # nothing fetched again
    state = json.loads((tmp_path / "idx" / SYNC_FILE).read_text())
    assert [s["added"] for s in state["syncs"]] == [3, 0] and state["url"] == orthanc.dicomweb_url
    assert orthanc.password not in json.dumps(state)


def test_cli_build_from_dicomweb_then_sync(orthanc, tmp_path, monkeypatch, capsys, fake_models):
    """The commands a user runs: import from the archive, build, upload more, `cxr index sync` (twice)."""
    monkeypatch.setenv("CXR_DICOMWEB_TOKEN", orthanc.token)
    upload(orthanc, [make_radiograph(tmp_path / f"a/{i}.dcm", f"P{i}", f"S{i}", size=32, seed=i) for i in range(4)])
    manifest, idx = tmp_path / "pacs.parquet", tmp_path / "idx"
    assert main(["data", "import", "dicomweb", orthanc.dicomweb_url, "--out", str(manifest)]) == 0
    build = ["index", "build", "-m", str(manifest), "--model", "fake-0", "--out", str(idx), "--workers", "0"]
    assert main(build) == 0
    upload(orthanc, [make_radiograph(tmp_path / "b.dcm", "P9", "S9", size=32, seed=9)])
    capsys.readouterr()
    sync = ["index", "sync", orthanc.dicomweb_url, "--index", str(idx), "--model", "fake-0", "--workers", "0", "--json"]
    assert main(sync) == 0
    first = json.loads(capsys.readouterr().out)
    assert (first["found"], first["new"], first["added"], first["add"]["count"]) == (5, 1, 1, 5)
    assert main(sync) == 0
    assert json.loads(capsys.readouterr().out)["added"] == 0
    assert json.loads((idx / SYNC_FILE).read_text())["cache"] == str(tmp_path / "dicom-cache")


def test_cli_refuses_dicomweb_options_for_other_kinds(tmp_path, capsys):
    out = str(tmp_path / "m.parquet")
    assert main(["data", "import", "dicom", str(tmp_path), "--out", out, "--token", "x"]) == 2
    assert "--token: only for the dicomweb kind" in capsys.readouterr().err
    assert main(["data", "import", "csv", str(tmp_path / "a.csv"), "--out", out, "--pseudonymize", "k"]) == 2


def test_study_date_range_and_filters_narrow_the_search(orthanc, tmp_path):
    dates = ["20230105", "20240110", "20240620", "20250101"]
    upload(orthanc, [make_radiograph(tmp_path / f"{d}.dcm", f"P{i}", f"S{i}", size=32, seed=i, study_date=d,
                                     accession=f"ACC{i}") for i, d in enumerate(dates)])  # fmt: skip
    opts = web_options(orthanc)
    got = import_source("dicomweb", orthanc.dicomweb_url, cache=tmp_path / "c", since="2024-01-01",
                        until="20241231", **opts)  # fmt: skip
    assert sorted(got["study_date"]) == ["20240110", "20240620"]
    since = import_source("dicomweb", orthanc.dicomweb_url, cache=tmp_path / "c", since="20240601", **opts)
    assert sorted(since["study_date"]) == ["20240620", "20250101"]
    one = import_source("dicomweb", orthanc.dicomweb_url, cache=tmp_path / "c", filters={"AccessionNumber": "ACC2"},
                        **opts)  # fmt: skip
    assert list(one["accession_number"]) == ["ACC2"]
    with pytest.raises(ImportError_, match="bad date"):
        import_source("dicomweb", orthanc.dicomweb_url, cache=tmp_path / "c", since="June 2024", **opts)
