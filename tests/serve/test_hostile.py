"""`cxr serve` under hostile requests (issue 29, items 7, 8 and 10): every malformed request gets a 4xx with one
line of JSON, never a 500; text is bounded in length; uploads are bounded by pixels and decode memory from their
header, and decode a few at a time.

The server is the one tests/serve/test_app.py serves (FakeModel index and the tiny trained VLM: the `data` and `vlm`
fixtures of tests/serve/conftest.py), through FastAPI's TestClient.
"""

from __future__ import annotations

import io
import json
import resource
import struct
import threading
import time
import zlib

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("fastapi", reason="the serve extra is not installed: pip install -e '.[serve]'")

from fastapi.testclient import TestClient  # noqa: E402
from gen_synth import one_thread  # noqa: E402, F401 (an autouse fixture)
from index_helpers import FakeModel  # noqa: E402

from retrieval.text_limits import MAX_QUERY_CHARS  # noqa: E402
from serve.app import create_app  # noqa: E402
from serve.service import ServeConfig, ServeService  # noqa: E402


@pytest.fixture(scope="module")
def service(data, vlm):
    svc = ServeService(ServeConfig(index=data[2], vlm=vlm, workers=2, watch_interval=0), model=FakeModel())
    yield svc
    svc.close()


@pytest.fixture(scope="module")
def client(service):
    with TestClient(create_app(service), raise_server_exceptions=False) as c:
        yield c


def png_of(width: int, height: int, mode: str = "RGBA") -> bytes:
    """A valid PNG of zeros, compressed row by row: a few hundred KB, its pixels never in memory at once."""
    color_type, channels = {"L": (0, 1), "RGB": (2, 3), "RGBA": (6, 4)}[mode]

    def chunk(tag: bytes, payload: bytes) -> bytes:
        crc = zlib.crc32(tag + payload) & 0xFFFFFFFF
        return struct.pack(">I", len(payload)) + tag + payload + struct.pack(">I", crc)

    z = zlib.compressobj(6)
    row = bytes(1 + width * channels)
    idat = b"".join(z.compress(row) for _ in range(height)) + z.flush()
    head = struct.pack(">IIBBBBB", width, height, 8, color_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", head) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


# ---------------------------------------------------------------------------------------------- the corpus

DEEP = 100_000
JSON_BODIES = {
    "deep array": "[" * DEEP + "]" * DEEP,
    "deep object": '{"text": ' + '{"a": ' * DEEP + "1" + "}" * DEEP + "}",
    "deep text value": '{"text": ' + "[" * DEEP + "]" * DEEP + "}",
    "huge integer k": '{"text": "effusion", "k": ' + "9" * 5000 + "}",
    "huge float k": '{"text": "effusion", "k": 1e400}',
    "big k": '{"text": "effusion", "k": 1e300}',
    "NaN k": '{"text": "effusion", "k": NaN}',
    "Infinity k": '{"text": "effusion", "k": -Infinity}',
    "NaN text": '{"text": NaN}',
    "text a number": '{"text": 5}',
    "text a list": '{"text": ["effusion"]}',
    "text an object": '{"text": {"a": "effusion"}}',
    "text null": '{"text": null}',
    "k a string": '{"text": "effusion", "k": "five"}',
    "k a bool": '{"text": "effusion", "k": true}',
    "k a list": '{"text": "effusion", "k": [5]}',
    "target a number": '{"text": "effusion", "target": 3}',
    "task a list": '{"task": ["vqa"]}',
    "a list": '["text"]',
    "a string": '"effusion"',
    "a number": "12",
    "null": "null",
    "truncated": '{"text": "effus',
    "trailing garbage": '{"text": "effusion"} x',
    "empty": "",
    "over-long text": json.dumps({"text": "effusion " * (MAX_QUERY_CHARS // 9 + 1)}),
}
RAW_BODIES = {
    "invalid UTF-8 JSON": (b'{"text": "\xff\xfe\xfa"}', "application/json"),
    "UTF-16 JSON": ('{"text": "effusion"}'.encode("utf-16"), "application/json"),  # JSON is UTF-8 (RFC 8259)
    "binary JSON": (bytes(range(256)) * 4, "application/json"),
    "plain text": (b"pleural effusion", "text/plain"),
    "xml": (b"<text>effusion</text>", "application/xml"),
    "form without boundary": (b"--x\r\n\r\n", "multipart/form-data"),
    "form with a bad boundary": (b"garbage" * 20, "multipart/form-data; boundary=zzz"),
    "urlencoded k NaN": (b"text=effusion&k=NaN", "application/x-www-form-urlencoded"),
    "urlencoded invalid UTF-8": (b"text=%ff%fe&k=%ff", "application/x-www-form-urlencoded"),
    "no content type": (b"\x00\x01\x02garbage", ""),
    "a GIF": (b"GIF89a" + bytes(64), "image/gif"),
    "a PNG header only": (b"\x89PNG\r\n\x1a\n" + bytes(30), "image/png"),
    "empty image": (b"", "image/png"),
}
MULTIPART = {
    "multipart without a file": {"data": {"k": "3", "target": "images"}},
    "multipart two files": {"files": [("image", ("a.png", b"x", "image/png")), ("image", ("b.png", b"y", "image/x"))]},
    "multipart k huge": {"data": {"k": "9" * 5000}, "files": {"image": ("a.png", b"\x89PNG\r\n\x1a\n", "image/png")}},
    "multipart text file": {"files": {"image": ("a.txt", b"effusion", "text/plain")}},
    "multipart over-long question": {"data": {"task": "vqa", "question": "is there " * 2000}},
}
ENDPOINTS = [("POST", "/search"), ("POST", "/generate"), ("POST", "/reload")]
GETS = [
    "/studies/%ff%fe",
    "/studies/" + "s" * 5000,
    "/studies/s3/image?size=1e400",
    "/studies/s3/image?size=NaN",
    "/studies/s3/image?size=-1",
    "/studies/s3/image?size=" + "9" * 5000,
    "/studies/s3/image?image_id=%00",
    "/nowhere",
]


def assert_one_line_4xx(r, what: str) -> None:
    assert 400 <= r.status_code < 500, (what, r.status_code, r.text[:300])
    doc = r.json()
    assert isinstance(doc, dict) and isinstance(doc.get("detail"), str), (what, r.text[:300])
    assert "\n" not in doc["detail"] and "Traceback" not in doc["detail"], what


def corpus() -> list[tuple[str, dict]]:
    json_type = {"Content-Type": "application/json"}
    cases = [(f"json {k}", {"content": v.encode(), "headers": json_type}) for k, v in JSON_BODIES.items()]
    for what, (body, ctype) in RAW_BODIES.items():
        cases.append((what, {"content": body, "headers": {"Content-Type": ctype}} if ctype else {"content": body}))
    cases += list(MULTIPART.items())
    return cases


@pytest.mark.parametrize(("method", "path"), ENDPOINTS)
def test_hostile_bodies_get_a_4xx_in_one_line_of_json(client, method, path):
    for what, kwargs in corpus():
        if path == "/reload" and what == "json empty":
            continue  # a reload's one valid body
        r = client.request(method, path, **kwargs)
        assert_one_line_4xx(r, f"{method} {path}: {what}")
    assert client.get("/health").json()["status"] == "ok"


def test_hostile_query_strings_and_paths_get_a_4xx(client):
    for path in GETS:
        assert_one_line_4xx(client.get(path), path)
    for query in ("k=1e400", "k=NaN", "k=" + "9" * 5000, "target=%ff", "k=-1"):
        r = client.post(f"/search?{query}", json={"text": "effusion"})
        assert_one_line_4xx(r, query)


def test_a_100000_deep_json_body_is_422_not_500(client):
    r = client.post("/search", content=b"[" * DEEP + b"]" * DEEP, headers={"Content-Type": "application/json"})
    assert r.status_code == 422 and "nested too deeply" in r.json()["detail"]


# ---------------------------------------------------------------------------------------------- text


def test_over_long_text_and_questions_are_413_naming_the_limit(client, data):
    text = "pleural effusion " * (MAX_QUERY_CHARS // 17 + 1)
    r = client.post("/search", json={"text": text})
    assert r.status_code == 413 and "the limit is 10,000" in r.json()["detail"]
    assert client.post("/search", json={"text": text[:MAX_QUERY_CHARS]}).status_code == 200  # at the limit: served
    png = (data[0] / "img" / "1.png").read_bytes()
    r = client.post("/generate", files={"image": ("1.png", png, "image/png")}, data={"task": "vqa", "question": text})
    assert r.status_code == 413 and r.json()["detail"].startswith("the question is")
    r = client.post("/generate", files={"image": ("1.png", png, "image/png")}, data={"task": "ground", "phrase": text})
    assert r.status_code == 413 and r.json()["detail"].startswith("the phrase is")


# ---------------------------------------------------------------------------------------------- images


def test_a_small_png_of_8192x8192_is_refused_from_its_header(data):
    bomb = png_of(8192, 8192, "RGBA")
    assert len(bomb) < 1_500_000  # a legal, small file: 268 MB of pixels
    svc = ServeService(ServeConfig(index=data[2], workers=2, watch_interval=0), model=FakeModel())  # the defaults
    try:
        with TestClient(create_app(svc)) as c:
            before = peak_rss_mb()
            t0 = time.perf_counter()
            r = c.post("/search", files={"image": ("bomb.png", bomb, "image/png")})
            took = time.perf_counter() - t0
            grew = peak_rss_mb() - before
            assert r.status_code == 422 and "8192x8192 pixels is over the limit of 36,000,000" in r.json()["detail"]
            assert grew < 150, f"the peak RSS grew {grew:.0f} MB"  # decoding it would take ~3 GB
            assert took < 5
            # under the pixel limit, yet RGBA at 44 bytes a pixel to decode: over the 1,024 MB of one request
            r = c.post("/search", files={"image": ("wide.png", png_of(5200, 5200, "RGBA"), "image/png")})
            assert r.status_code == 422 and "MB to decode; the limit is 1,024 MB" in r.json()["detail"]
            assert peak_rss_mb() - before < 150
            assert list(svc.upload_dir.iterdir()) == []
    finally:
        svc.close()


def test_a_grey_image_under_the_limits_is_served(data):
    svc = ServeService(
        ServeConfig(index=data[2], workers=2, watch_interval=0, max_pixels=4_000_000, max_decode_mb=64),
        model=FakeModel(),
    )
    try:
        with TestClient(create_app(svc)) as c:
            ok = c.post("/search", files={"image": ("g.png", png_of(1500, 1500, "L"), "image/png")})  # ~36 MB
            assert ok.status_code == 200, ok.text
            r = c.post("/search", files={"image": ("c.png", png_of(1500, 1500, "RGBA"), "image/png")})  # ~94 MB
            assert r.status_code == 422 and "the limit is 64 MB" in r.json()["detail"]
    finally:
        svc.close()


def test_decodes_run_at_most_max_decodes_at_once(data, monkeypatch):
    import retrieval.data.image_io as image_io

    real, running, most = image_io.read_image, [0], [0]
    lock = threading.Lock()

    def slow_read(*a, **k):
        with lock:
            running[0] += 1
            most[0] = max(most[0], running[0])
        time.sleep(0.15)
        try:
            return real(*a, **k)
        finally:
            with lock:
                running[0] -= 1

    monkeypatch.setattr(image_io, "read_image", slow_read)
    svc = ServeService(ServeConfig(index=data[2], workers=6, watch_interval=0, max_decodes=2), model=FakeModel())
    try:
        with TestClient(create_app(svc)) as c:
            png = (data[0] / "img" / "3.png").read_bytes()
            codes = []

            def one() -> None:
                codes.append(c.post("/search", files={"image": ("3.png", png, "image/png")}).status_code)

            threads = [threading.Thread(target=one) for _ in range(6)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
        assert codes == [200] * 6 and most[0] == 2
    finally:
        svc.close()


def test_png_of_is_a_real_png():
    img = Image.open(io.BytesIO(png_of(40, 30, "RGB")))
    assert img.size == (40, 30) and img.mode == "RGB" and not np.asarray(img).any()


def test_generate_reveals_no_server_path(client, data):
    png = (data[0] / "img" / "1.png").read_bytes()
    for task in ("report", "identify", "vqa"):
        r = client.post("/generate", files={"image": ("1.png", png, "image/png")}, data={"task": task, "k": "2"})
        assert r.status_code == 200 and str(data[0]) not in r.text and "/tmp/" not in r.text, r.text[:300]
