"""`cxr serve`: the HTTP API over a tiny synthetic index and VLM, through FastAPI's TestClient.

The index is built with the seeded `FakeModel` over `gen_synth`'s images (bright boxes that match their labels);
the VLM is the tiny patch-encoder model `test_gen_e2e` trains, 120 steps. Nothing is downloaded.
"""

from __future__ import annotations

import io
import json
import shutil
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("fastapi", reason="the serve extra is not installed: pip install -e '.[serve]'")
pytest.importorskip("httpx", reason="FastAPI's TestClient needs httpx (the serve extra)")

from fastapi.testclient import TestClient  # noqa: E402
from gen_synth import make_manifest, one_thread  # noqa: E402, F401 (an autouse fixture)
from test_index_helpers import FakeModel  # noqa: E402

from cli.main import main  # noqa: E402
from index.build import BuildOptions, add_to_index, build_index  # noqa: E402
from retrieval.study_text import shared_sentences, split_sentences  # noqa: E402
from serve.app import bind_warning, create_app, is_loopback  # noqa: E402
from serve.batching import EmbedBatcher  # noqa: E402
from serve.service import ServeConfig, ServeService  # noqa: E402
from serve.uploads import sniff  # noqa: E402

TINY = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 2}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """(root, manifest frame, index folder) over 36 synthetic studies."""
    root = tmp_path_factory.mktemp("serve")
    df = make_manifest(root, n=36)
    build_index(df, FakeModel(), root / "idx", options=BuildOptions(workers=0, progress=False))
    return root, df, root / "idx"


@pytest.fixture(scope="module")
def vlm(data):
    from generation.training.train import VLMTrainConfig, train_vlm

    root, df, idx = data
    cfg = VLMTrainConfig(
        encoders=["patch:1"],
        steps=120,
        batch_size=8,
        lm_path="tiny",
        lm_overrides=TINY,
        rag_k=2,
        visual_grid=4,
        lr=3e-3,
        checkpoint_every=1000,
    )
    train_vlm(df, root / "vlm", cfg, index_dir=idx, progress=False)
    return root / "vlm"


@pytest.fixture(scope="module")
def service(data, vlm):
    svc = ServeService(
        ServeConfig(index=data[2], vlm=vlm, workers=2, watch_interval=0, show_paths=True), model=FakeModel()
    )
    yield svc
    svc.close()


@pytest.fixture(scope="module")
def client(service):
    with TestClient(create_app(service)) as c:
        yield c


@pytest.fixture
def fake_models(monkeypatch):
    """`--model fake-N` loads FakeModel(seed=N) in `cxr query` and `cxr serve`."""
    monkeypatch.setattr("retrieval.models.load_model", lambda name, device=None: FakeModel(seed=int(str(name)[-1])))


def png_bytes(path: Path) -> bytes:
    return Path(path).read_bytes()


def write_dicom(path: Path, pixels: np.ndarray | None) -> Path:
    """A minimal 8-bit MONOCHROME2 DICOM holding `pixels` (None: a DICOM without pixel data)."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.Modality = "DX"
    if pixels is not None:
        ds.Rows, ds.Columns = pixels.shape
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
        ds.PixelData = pixels.astype(np.uint8).tobytes()
    ds.save_as(path, enforce_file_format=True)
    return path


def cli_query(args: list[str], capsys) -> dict:
    capsys.readouterr()
    assert main(["query", *args, "--model", "fake-0", "--json"]) == 0
    return json.loads(capsys.readouterr().out)


# ---------------------------------------------------------------------------------------------- search


@pytest.mark.parametrize("target", ["reports", "images"])
def test_image_search_returns_what_cxr_query_json_returns(client, data, fake_models, capsys, target):
    root, df, idx = data
    png = root / "img" / "4.png"
    want = cli_query([str(png), "--index", str(idx), "-k", "4", "--target", target], capsys)
    r = client.post(
        "/search", files={"image": ("4.png", png_bytes(png), "image/png")}, data={"k": "4", "target": target}
    )
    assert r.status_code == 200, r.text
    got = r.json()
    assert got["results"] == want["results"] and len(got["results"]) == 4
    assert (got["k"], got["target"], got["image"], got["index"]) == (4, target, "4.png", str(idx))
    if target == "images":
        assert got["results"][0]["image_id"] == "img4" and got["results"][0]["score"] == pytest.approx(1.0, abs=1e-5)


def test_text_search_as_json_body_and_exclude_patient(client, data, fake_models, capsys):
    idx = data[2]
    want = cli_query(["--text", "pleural effusion", "--index", str(idx), "-k", "3"], capsys)
    got = client.post("/search", json={"text": "pleural effusion", "k": 3}).json()
    assert got["results"] == want["results"] and got["text"] == "pleural effusion"
    patient = got["results"][0]["patient_id"]
    want = cli_query(
        ["--text", "pleural effusion", "--index", str(idx), "-k", "3", "--exclude-patient", patient], capsys
    )
    got = client.post("/search?k=3", json={"text": "pleural effusion", "exclude_patient": patient}).json()
    assert got["results"] == want["results"] and patient not in {r["patient_id"] for r in got["results"]}


def test_dicom_upload_multipart_and_raw_body(client, data, tmp_path):
    root, df, _ = data
    pixels = np.asarray(Image.open(root / "img" / "7.png"))
    dcm = write_dicom(tmp_path / "q.dcm", pixels).read_bytes()
    a = client.post("/search", files={"image": ("q.dcm", dcm, "application/dicom")}, data={"target": "images"})
    b = client.post("/search?target=images&filename=q.dcm", content=dcm, headers={"Content-Type": "application/dicom"})
    assert a.status_code == b.status_code == 200
    assert a.json()["results"] == b.json()["results"]
    assert a.json()["results"][0]["image_id"] == "img7"  # the same picture as the indexed PNG


def test_usage_errors_are_422(client):
    assert client.post("/search", json={"text": ""}).status_code == 422
    assert client.post("/search", json={"text": "x", "k": 0}).status_code == 422
    assert client.post("/search", json={"text": "x", "k": "many"}).status_code == 422
    assert client.post("/search", json={"text": "x", "target": "words"}).status_code == 422
    assert client.post("/search", json={}).status_code == 422
    assert client.post("/search", content=b"{not json", headers={"Content-Type": "application/json"}).status_code == 422
    r = client.post("/search", json={"text": "x", "k": 0})
    assert "k must be" in r.json()["detail"]


# ---------------------------------------------------------------------------------------------- bad uploads


@pytest.fixture
def strict(data, tmp_path, monkeypatch):
    """A service with a 64 KiB upload limit and a 50,000-pixel limit, its temporary files under tmp_path/tmp."""
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp))
    svc = ServeService(
        ServeConfig(index=data[2], workers=2, watch_interval=0, max_upload_mb=1 / 16, max_pixels=50_000),
        model=FakeModel(),
    )
    with TestClient(create_app(svc)) as c:
        yield c, svc, tmp
    svc.close()
    assert not svc.upload_dir.exists()


def test_bad_uploads_get_their_status_and_leave_no_files(strict, data, tmp_path):
    c, svc, tmp = strict
    root = data[0]
    good = png_bytes(root / "img" / "2.png")
    big = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (300, 300), dtype=np.uint8)).save(big, "PNG")
    huge_pixels = io.BytesIO()
    Image.new("L", (400, 400)).save(huge_pixels, "PNG")  # 160,000 pixels: over the limit, yet a tiny file

    def post(content: bytes, name: str, ctype: str):
        return c.post("/search", files={"image": (name, content, ctype)})

    cases = {
        "over the size limit": (post(big.getvalue(), "big.png", "image/png"), 413, "over the limit"),
        "not an image": (post(b"hello, world\n" * 10, "notes.txt", "text/plain"), 415, "unsupported image type"),
        "gif": (post(b"GIF89a" + bytes(40), "x.gif", "image/gif"), 415, "unsupported"),
        "truncated png": (post(good[:80], "cut.png", "image/png"), 422, "cut.png: corrupt or truncated"),
        "over the pixel limit": (post(huge_pixels.getvalue(), "wide.png", "image/png"), 422, "over the limit"),
        "dicom without pixels": (
            post(write_dicom(tmp_path / "np.dcm", None).read_bytes(), "np.dcm", "application/dicom"),
            422,
            "np.dcm",
        ),
        "empty": (post(b"", "e.png", "image/png"), 422, "empty"),
    }
    for what, (r, status, words) in cases.items():
        assert r.status_code == status, (what, r.status_code, r.text)
        assert words in r.json()["detail"], (what, r.json())
        assert str(svc.upload_dir) not in r.json()["detail"]  # the reader's message names the upload, not our file
    # the same over the raw-body route, and a streamed (chunked) body with no Content-Length
    assert c.post("/search", content=big.getvalue(), headers={"Content-Type": "image/png"}).status_code == 413

    def chunks():
        for _ in range(40):
            yield bytes(4096)

    assert c.post("/search", content=chunks(), headers={"Content-Type": "image/png"}).status_code == 413
    assert c.post("/generate", files={"image": ("x.txt", b"plain text", "text/plain")}).status_code in (415, 422)
    # nothing left behind, and the server still answers
    assert list(svc.upload_dir.iterdir()) == []
    assert [p.name for p in tmp.iterdir()] == [svc.upload_dir.name]
    assert c.get("/health").json()["status"] == "ok"
    assert post(good, "2.png", "image/png").status_code == 200


def test_sniff():
    assert sniff(b"\x89PNG\r\n\x1a\n....") == "png"
    assert sniff(b"\xff\xd8\xff\xe0") == "jpeg"
    assert sniff(bytes(128) + b"DICM") == "dicom"
    assert sniff(b"\x08\x00\x05\x00", "raw.dcm") == "dicom"  # no preamble: by name
    assert sniff(b"\x08\x00\x05\x00", "raw", "application/dicom") == "dicom"
    assert sniff(b"GIF89a") is None and sniff(b"") is None


# ---------------------------------------------------------------------------------------------- generation


def test_generate_returns_text_boxes_and_the_exemplars_it_used(client, data):
    root, df, idx = data
    png = png_bytes(root / "img" / "1.png")  # a pleural effusion
    r = client.post("/generate", files={"image": ("1.png", png, "image/png")}, data={"task": "report", "k": "2"})
    assert r.status_code == 200, r.text
    res = r.json()
    assert res["task"] == "report" and res["text"]
    assert len(res["exemplars"]) == 2
    for e in res["exemplars"]:
        study = client.get(f"/studies/{e['study_id']}").json()
        assert e["report"] == study["report"] and e["labels"] == study["labels"]
        assert set(e["shared"]) <= set(split_sentences(res["text"]))
        assert all(s in shared_sentences(res["text"], e["report"]) for s in e["shared"])
        assert e["report_sentences"] == split_sentences(e["report"])  # the viewer's split is the server's
        assert set(e["matched"]) <= set(e["report_sentences"])
        assert isinstance(e["score"], float)
    assert [s["text"] for s in res["sentences"]] == split_sentences(res["text"])

    ident = client.post("/generate", files={"image": ("1.png", png, "image/png")}, data={"task": "identify"}).json()
    assert isinstance(ident["boxes"], list)
    assert all(0 <= b[c] <= 1 for b in ident["boxes"] for c in ("x1", "y1", "x2", "y2"))
    g = client.post("/generate?task=ground&phrase=right%20lung&k=0", content=png, headers={"Content-Type": "image/png"})
    assert g.status_code == 200 and g.json()["exemplars"] == [] and "boxes" in g.json()
    v = client.post(
        "/generate",
        files={"image": ("1.png", png, "image/png")},
        data={"task": "vqa", "question": "is there a pleural effusion?"},
    )
    assert v.status_code == 200 and v.json()["prompt"] == "is there a pleural effusion?"
    assert (
        client.post("/generate", files={"image": ("1.png", png, "image/png")}, data={"task": "ground"}).status_code
        == 422
    )  # no phrase
    assert (
        client.post("/generate", files={"image": ("1.png", png, "image/png")}, data={"task": "poem"}).status_code == 422
    )
    assert client.post("/generate", json={"task": "report"}).status_code == 422  # no image


def test_generate_without_a_vlm_is_a_usage_error(data):
    svc = ServeService(ServeConfig(index=data[2], workers=1, watch_interval=0), model=FakeModel())
    try:
        with TestClient(create_app(svc)) as c:
            r = c.post("/generate", files={"image": ("1.png", png_bytes(data[0] / "img" / "1.png"), "image/png")})
        assert r.status_code == 422 and "--vlm" in r.json()["detail"]
    finally:
        svc.close()


# ---------------------------------------------------------------------------------------------- studies


def test_studies_are_looked_up_in_the_index(client, data):
    root, df, _ = data
    s = client.get("/studies/s3").json()
    row = df[df["study_id"] == "s3"].iloc[0]
    assert s["report"] == row["report"] and s["labels"] == list(row["labels"]) and s["patient_id"] == row["patient_id"]
    assert [i["image_id"] for i in s["images"]] == ["img3"]
    r = client.get("/studies/s3/image?size=32")
    assert r.status_code == 200 and r.headers["content-type"] == "image/png"
    assert Image.open(io.BytesIO(r.content)).size == (32, 32)
    assert max(Image.open(io.BytesIO(client.get("/studies/s3/image").content)).size) == 256
    assert client.get("/studies/s3/image?image_id=img3").status_code == 200
    assert client.get("/studies/s3/image?image_id=img4").status_code == 404  # another study's image
    assert client.get("/studies/nope").status_code == 404
    assert client.get("/studies/s3/image?size=5000").status_code == 422
    for bad in ("..%2F..%2F..%2Fetc%2Fpasswd", "%2Fetc%2Fpasswd", "%2E%2E", "img%2F3.png"):
        assert client.get(f"/studies/{bad}").status_code == 404, bad
        assert client.get(f"/studies/{bad}/image").status_code == 404, bad


def test_missing_image_file_is_404_not_a_crash(data, tmp_path):
    root, df, _ = data
    copy = tmp_path / "root"
    shutil.copytree(root / "img", copy / "img")
    d2 = df.copy()
    d2.attrs["root"] = str(copy)
    build_index(d2, FakeModel(), tmp_path / "idx", options=BuildOptions(workers=0, progress=False))
    (copy / "img" / "5.png").unlink()
    svc = ServeService(ServeConfig(index=tmp_path / "idx", workers=1, watch_interval=0), model=FakeModel())
    try:
        with TestClient(create_app(svc)) as c:
            r = c.get("/studies/s5/image")
            assert r.status_code == 404 and "file not found" in r.json()["detail"]
            assert c.get("/studies/s6/image").status_code == 200
    finally:
        svc.close()


# ---------------------------------------------------------------------------------------------- service


def test_health_info_page_and_schema(client, service):
    assert client.get("/health").json() == {"status": "ok", "count": 36}
    info = client.get("/info").json()
    assert info["model"] == {"name": "fake-0", "fingerprint": FakeModel().fingerprint, "embed_dim": 32}
    assert (info["index"]["count"], info["index"]["studies"], info["index"]["factory"]) == (36, 36, "Flat")
    assert info["vlm"]["loaded"] and {"torch", "faiss-cpu", "fastapi", "cxr-retrieval"} <= set(info["versions"])
    page = client.get("/")
    assert page.status_code == 200 and 'id="drop"' in page.text and "Content-Security-Policy" in page.headers
    assert client.get("/static/app.js").status_code == 200
    paths = client.get("/openapi.json").json()["paths"]
    assert {
        "/search",
        "/generate",
        "/studies/{study_id}",
        "/studies/{study_id}/image",
        "/health",
        "/info",
        "/reload",
    } <= set(paths)
    assert "multipart/form-data" in paths["/search"]["post"]["requestBody"]["content"]


def test_bearer_token(service):
    with TestClient(create_app(service, token="s3cret")) as c:
        for r in (
            c.post("/search", json={"text": "x"}),
            c.get("/info"),
            c.get("/studies/s1"),
            c.get("/studies/s1/image"),
            c.post("/reload"),
        ):
            assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
        assert c.get("/info", headers={"Authorization": "Bearer nope"}).status_code == 401
        assert c.get("/info", headers={"Authorization": "s3cret"}).status_code == 401
        ok = {"Authorization": "Bearer s3cret"}
        assert c.post("/search", json={"text": "effusion"}, headers=ok).status_code == 200
        assert c.get("/studies/s1/image", headers=ok).status_code == 200
        assert c.get("/health").status_code == 200 and c.get("/").status_code == 200  # the page asks for the token


def test_cors_is_off_by_default(service):
    origin = {"Origin": "https://evil.example"}
    with TestClient(create_app(service)) as c:
        r = c.post("/search", json={"text": "effusion"}, headers=origin)  # a cross-site post: refused (issue 29)
        assert r.status_code == 403 and "access-control-allow-origin" not in r.headers
        r = c.get("/health", headers=origin)
        assert r.status_code == 200 and "access-control-allow-origin" not in r.headers
        pre = c.options("/search", headers={**origin, "Access-Control-Request-Method": "POST"})
        assert "access-control-allow-origin" not in pre.headers
    with TestClient(create_app(service, cors_origins=["https://ok.example"])) as c:
        r = c.get("/health", headers={"Origin": "https://ok.example"})
        assert r.headers["access-control-allow-origin"] == "https://ok.example"


def test_loopback_default_and_the_warning(data, fake_models, monkeypatch, capsys):
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost") and is_loopback("127.0.0.2")
    assert not is_loopback("0.0.0.0") and not is_loopback("192.168.1.4") and not is_loopback("::")
    assert bind_warning("127.0.0.1", None) is None and bind_warning("0.0.0.0", "t") is None
    assert "--token" in bind_warning("0.0.0.0", None)
    calls = []
    monkeypatch.setattr("uvicorn.run", lambda app, **kw: calls.append(kw))
    base = ["serve", "--index", str(data[2]), "--model", "fake-0", "--no-vlm", "--watch-interval", "0"]
    assert main(base) == 0
    assert calls[-1]["host"] == "127.0.0.1" and calls[-1]["port"] == 8000
    assert "warning" not in capsys.readouterr().err
    assert main([*base, "--host", "0.0.0.0", "--port", "8123"]) == 0
    assert calls[-1]["host"] == "0.0.0.0" and calls[-1]["port"] == 8123
    assert "without --token" in capsys.readouterr().err
    assert main([*base, "--host", "0.0.0.0", "--token", "t"]) == 0
    assert "warning" not in capsys.readouterr().err


def test_serve_without_a_demo_index_says_what_to_do(monkeypatch, tmp_path, capsys):
    import serve.demo_pipeline as dp

    monkeypatch.setattr(dp, "DEFAULT_WORKDIR", tmp_path / "demo")
    assert main(["serve"]) == 2
    assert "cxr demo" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------- concurrency


class SlowModel(FakeModel):
    """FakeModel whose image tower takes 20 ms a pass (any batch size), so concurrent requests queue up."""

    def image_features(self, pixels):
        time.sleep(0.02)
        return super().image_features(pixels)


def test_concurrent_searches_share_forward_passes_and_stay_correct(data):
    root, df, idx = data
    svc = ServeService(ServeConfig(index=idx, workers=8, watch_interval=0), model=SlowModel())
    try:
        from retrieval.data.image_io import read_image

        images = [read_image(root / "img" / f"{i}.png") for i in range(16)]
        alone = [svc.search(image=im, k=3, target="images") for im in images]
        assert svc.batcher.stats.largest == 1
        with TestClient(create_app(svc)) as c:
            out: dict[int, dict] = {}

            def one(i: int) -> None:
                files = {"image": (f"{i}.png", png_bytes(root / "img" / f"{i}.png"), "image/png")}
                out[i] = c.post("/search", files=files, data={"k": "3", "target": "images"}).json()

            threads = [threading.Thread(target=one, args=(i,)) for i in range(16)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
        assert svc.batcher.stats.largest > 1  # at least one pass served several requests
        for i in range(16):
            got, want = out[i]["results"], alone[i]["results"]
            assert [r["row_id"] for r in got] == [r["row_id"] for r in want]
            assert [r["score"] for r in got] == pytest.approx([r["score"] for r in want], abs=1e-5)
            assert got[0]["image_id"] == f"img{i}"
    finally:
        svc.close()


def test_batcher_failure_fails_only_that_pass():
    b = EmbedBatcher(FakeModel(), max_batch=4)
    try:
        import torch

        with pytest.raises(RuntimeError):
            b.embed_image(torch.zeros(3, 5, 5))  # wrong shape for the fake tower's weights
        v = b.embed_image(FakeModel().image_transform()(np.zeros((16, 16), np.float32) + 0.7))
        assert v.shape == (32,) and abs(float(np.linalg.norm(v)) - 1) < 1e-5
        assert b.embed_text("pleural effusion").shape == (32,)
    finally:
        b.close()


# ---------------------------------------------------------------------------------------------- index swaps


@pytest.fixture
def growing(data, tmp_path):
    """An index of the first 24 studies; `add()` appends the other 12 as `cxr index add` does."""
    root, df, _ = data
    build_index(df.iloc[:24], FakeModel(), tmp_path / "idx", options=BuildOptions(workers=0, progress=False))

    def add():
        rest = df.iloc[24:].copy()
        rest.attrs["root"] = df.attrs["root"]
        add_to_index(tmp_path / "idx", rest, FakeModel(), options=BuildOptions(workers=0, progress=False))

    return tmp_path / "idx", add


class GatedModel(FakeModel):
    """Blocks its first image pass until `gate` is set, so a query can be held in flight."""

    def __init__(self):
        super().__init__()
        self.gate, self.entered, self.calls = threading.Event(), threading.Event(), 0

    def image_features(self, pixels):
        self.calls += 1
        if self.calls == 1:
            self.entered.set()
            assert self.gate.wait(30)
        return super().image_features(pixels)


def test_reload_swaps_the_index_and_in_flight_queries_finish_on_the_old(growing, data):
    idx, add = growing
    root = data[0]
    model = GatedModel()
    svc = ServeService(ServeConfig(index=idx, workers=2, watch_interval=0, one_per_patient=False), model=model)
    try:
        with TestClient(create_app(svc)) as c:
            png = png_bytes(root / "img" / "30.png")
            before = {}
            t = threading.Thread(
                target=lambda: before.update(
                    c.post(
                        "/search", files={"image": ("30.png", png, "image/png")}, data={"k": "100", "target": "images"}
                    ).json()
                )
            )
            t.start()
            assert model.entered.wait(30)  # the query holds the old index and waits in the model
            add()
            r = c.post("/reload").json()
            assert r["reloaded"] and (r["previous_count"], r["count"], r["generation"]) == (24, 36, 2)
            model.gate.set()
            t.join(30)
            assert len(before["results"]) == 24 and "img30" not in {x["image_id"] for x in before["results"]}
            after = c.post(
                "/search", files={"image": ("30.png", png, "image/png")}, data={"k": "100", "target": "images"}
            ).json()
            assert len(after["results"]) == 36 and after["results"][0]["image_id"] == "img30"
            assert c.get("/studies/s30").status_code == 200
            assert c.get("/info").json()["index"]["generation"] == 2
    finally:
        svc.close()


def test_the_watcher_picks_up_an_add_without_a_request(growing):
    idx, add = growing
    svc = ServeService(ServeConfig(index=idx, workers=1, watch_interval=0.1), model=FakeModel())
    try:
        assert svc.health()["count"] == 24
        add()
        deadline = time.time() + 20
        while svc.health()["count"] != 36 and time.time() < deadline:
            time.sleep(0.05)
        assert svc.health()["count"] == 36 and svc.snapshot.generation == 2
    finally:
        svc.close()


def test_a_broken_index_on_disk_keeps_the_old_one_serving(growing, fake_models):
    idx, _ = growing
    svc = ServeService(ServeConfig(index=idx, workers=1, watch_interval=0), model=FakeModel())
    try:
        with TestClient(create_app(svc)) as c:
            from index.store import INFO_FILE, resolve

            info_path = resolve(idx).gen_dir / INFO_FILE
            info = info_path.read_text()
            info_path.write_text("{ half written")
            r = c.post("/reload")
            assert r.status_code == 409 and "still serving generation 1" in r.json()["detail"]
            assert c.post("/search", json={"text": "effusion", "k": 2}).status_code == 200
            assert c.get("/info").json()["index"]["reload_error"]
            assert svc.check_for_change() is False  # the watcher's path: logged once, old index kept
            info_path.write_text(info)
            assert c.post("/reload").json()["generation"] == 2
            other = json.loads(info)
            other["model"]["fingerprint"] = "someone-else"
            info_path.write_text(json.dumps(other))  # no longer the info file its checksum in CURRENT names
            r = c.post("/reload")
            assert r.status_code == 409 and INFO_FILE in r.json()["detail"]
            assert c.get("/health").json()["count"] == 24
    finally:
        svc.close()


def test_demo_serve_serves_the_demo_folder(monkeypatch, tmp_path, capsys):
    import pandas as pd

    import serve.demo_pipeline as dp

    (tmp_path / "vlm").mkdir()
    (tmp_path / "vlm" / "vlm_config.json").write_text("{}")
    result = dp.DemoResult(
        tmp_path, {"image": "q.png", "study_id": "s", "labels": [], "report": ""}, pd.DataFrame(), None
    )
    monkeypatch.setattr(dp, "run_demo", lambda *a, **k: result)
    calls = []
    monkeypatch.setattr("cli.serve.serve", lambda index, vlm, **kw: calls.append((index, vlm, kw)))
    assert main(["demo", "--json", "--serve", "--port", "8123"]) == 0
    assert calls == [(tmp_path / "index", tmp_path / "vlm", {"host": "127.0.0.1", "port": 8123})]
    assert json.loads(capsys.readouterr().out)["workdir"] == str(tmp_path)
