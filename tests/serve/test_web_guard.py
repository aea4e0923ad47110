"""What `cxr serve` answers and reveals (issue 29, items 12-16): the Host allow-list, cross-site posts, no
server path in any response without --show-paths, Swagger UI from local files, and a reload error that clears
once the index opens again. Through FastAPI's TestClient over a FakeModel index.
"""

from __future__ import annotations

import re

import pytest

pytest.importorskip("fastapi", reason="the serve extra is not installed: pip install -e '.[serve]'")

from fastapi.testclient import TestClient  # noqa: E402
from gen_synth import make_manifest, one_thread  # noqa: E402, F401 (an autouse fixture)
from index_helpers import FakeModel  # noqa: E402

from index.build import BuildOptions, build_index  # noqa: E402
from serve.app import create_app  # noqa: E402
from serve.service import ServeConfig, ServeService  # noqa: E402
from serve.web_guard import allowed_hosts, host_allowed, host_of  # noqa: E402


@pytest.fixture(scope="module")
def index(tmp_path_factory):
    root = tmp_path_factory.mktemp("guard")
    df = make_manifest(root, n=12)
    build_index(df, FakeModel(), root / "idx", options=BuildOptions(workers=0, progress=False))
    return root


@pytest.fixture
def service(index):
    svc = ServeService(ServeConfig(index=index / "idx", workers=2, watch_interval=0), model=FakeModel())
    yield svc
    svc.close()


# ---------------------------------------------------------------------------------------------- 12: Host


def test_default_allow_lists():
    assert allowed_hosts("127.0.0.1") == ["127.0.0.1", "localhost", "::1"]
    assert allowed_hosts("::1") == ["::1", "localhost", "127.0.0.1"]
    assert allowed_hosts("192.168.1.4", ["cxr.example.org"]) == ["192.168.1.4", "cxr.example.org"]
    assert allowed_hosts("0.0.0.0") == ["*ip", "localhost", "127.0.0.1", "::1"]
    assert host_allowed("any.name", allowed_hosts("127.0.0.1", ["*"]))
    assert not host_allowed("any.name", allowed_hosts("127.0.0.1")) and host_allowed("::1", allowed_hosts("::1"))
    assert host_of("Example.org:8000") == "example.org" and host_of("[::1]:8000") == "::1" and host_of("::1") == "::1"


def test_a_foreign_host_is_refused(service):
    hosts = allowed_hosts("127.0.0.1", ["cxr.example.org"])
    with TestClient(create_app(service, allowed_hosts=hosts), base_url="http://127.0.0.1:8000") as c:
        assert c.get("/health").status_code == 200
        for ok in ("localhost:8000", "127.0.0.1", "[::1]:8000", "CXR.example.org"):
            assert c.get("/info", headers={"Host": ok}).status_code == 200, ok
        for bad in ("rebind.attacker.example", "attacker.example:8000", "127.0.0.1.attacker.example", ""):
            r = c.get("/info", headers={"Host": bad})
            assert r.status_code == 421, bad
            assert "--allowed-host" in r.json()["detail"]
            assert c.post("/search", json={"text": "effusion"}, headers={"Host": bad}).status_code == 421
    wild = allowed_hosts("0.0.0.0")
    with TestClient(create_app(service, allowed_hosts=wild), base_url="http://10.1.2.3:8000") as c:
        assert c.get("/info").status_code == 200  # an address names the server: no rebinding
        assert c.get("/info", headers={"Host": "rebind.attacker.example"}).status_code == 421


# ---------------------------------------------------------------------------------------------- 13: cross-site


def test_cross_site_posts_are_refused(service):
    hosts = allowed_hosts("127.0.0.1")
    app = create_app(service, allowed_hosts=hosts, cors_origins=["https://viewer.example.org"])
    with TestClient(app, base_url="http://127.0.0.1:8000") as c:
        foreign = {"Origin": "https://evil.example", "Content-Type": "text/plain"}
        r = c.post("/reload", content=b"x", headers=foreign)
        assert r.status_code == 403 and "cross-site" in r.json()["detail"]
        evil = {"Origin": "https://evil.example"}
        assert c.post("/search", json={"text": "effusion"}, headers=evil).status_code == 403
        assert c.post("/reload", headers={"Origin": "http://localhost:8000"}).status_code == 403  # another origin
        assert c.post("/reload", headers={"Origin": "null"}).status_code == 403
        assert c.post("/reload", headers={"Sec-Fetch-Site": "cross-site"}).status_code == 403
        # a text/plain or form post needs no CORS preflight: /reload refuses any body
        for ctype, body in (("text/plain", b"reload"), ("application/x-www-form-urlencoded", b"a=1")):
            r = c.post("/reload", content=body, headers={"Content-Type": ctype})
            assert r.status_code == 415 and "takes no body" in r.json()["detail"]
        # the same origin, a CORS origin, and a client that sends no Origin (curl) are served
        assert c.post("/reload", headers={"Origin": "http://127.0.0.1:8000"}).json()["reloaded"]
        assert c.post("/reload", headers={"Origin": "https://viewer.example.org"}).status_code == 200
        assert c.post("/reload").status_code == 200 and c.post("/reload", json={}).status_code == 200
        assert c.get("/info", headers={"Origin": "https://evil.example"}).status_code == 200  # a read: no CORS


# ---------------------------------------------------------------------------------------------- 14: paths

ABSOLUTE = re.compile(r"(?<![\w<])/(?:tmp|home|root|work|usr|etc|var)/")


def test_no_server_path_leaves_without_show_paths(index, service):
    root = str(index)
    with TestClient(create_app(service)) as c:
        texts = [
            c.get("/info").text,
            c.post("/search", json={"text": "effusion", "k": 5}).text,
            c.post("/search", json={"text": "effusion", "target": "images"}).text,
            c.post("/search", files={"image": ("3.png", (index / "img" / "3.png").read_bytes(), "image/png")}).text,
            c.get("/studies/s3").text,
        ]
        hit = c.post("/search", json={"text": "effusion"}).json()
        assert "index" not in hit and all("image_path" not in r for r in hit["results"])
        assert "path" not in c.get("/info").json()["index"]
        # a reload error names the broken file, not where it lies
        from index.store import INFO_FILE, resolve

        info_path = resolve(index / "idx").gen_dir / INFO_FILE
        saved = info_path.read_bytes()
        info_path.write_text("{ half written")
        try:
            r = c.post("/reload")
            assert r.status_code == 409 and INFO_FILE in r.json()["detail"]
            texts += [r.text, c.get("/info").text]
            assert c.get("/info").json()["index"]["reload_error"]
        finally:
            info_path.write_bytes(saved)
    for text in texts:
        assert root not in text and not ABSOLUTE.search(text), text[:400]


def test_show_paths_reveals_them(index):
    svc = ServeService(
        ServeConfig(index=index / "idx", workers=1, watch_interval=0, show_paths=True), model=FakeModel()
    )
    try:
        with TestClient(create_app(svc)) as c:
            hit = c.post("/search", json={"text": "effusion"}).json()
            assert hit["index"] == str(index / "idx") and hit["results"][0]["image_path"].startswith(str(index))
            assert c.get("/info").json()["index"]["path"] == str(index / "idx")
    finally:
        svc.close()


# ---------------------------------------------------------------------------------------------- 15: /docs


def test_docs_load_only_local_files(service):
    with TestClient(create_app(service)) as c:
        page = c.get("/docs")
        assert page.status_code == 200 and "swagger" in page.text.lower()
        urls = re.findall(r"""(?:src|href)\s*=\s*["']([^"']+)["']""", page.text)
        urls += re.findall(r"""url:\s*['"]([^'"]+)['"]""", page.text)
        assert len(urls) >= 3, urls  # the script, the style sheet, the schema
        for url in urls:
            assert url.startswith("/") and not url.startswith("//"), f"/docs loads {url} from elsewhere"
            assert c.get(url).status_code == 200, url
        assert "cdn" not in page.text.lower() and "https://" not in page.text


# ---------------------------------------------------------------------------------------------- 16: stale error


def test_info_clears_a_reload_error_once_the_index_opens_again(index, service):
    from index.store import INFO_FILE, resolve

    info_path = resolve(index / "idx").gen_dir / INFO_FILE
    saved = info_path.read_bytes()
    with TestClient(create_app(service)) as c:
        info_path.write_text("{ half written")
        try:
            assert c.post("/reload").status_code == 409
            assert c.get("/info").json()["index"]["reload_error"]
            service._last_retry = 0.0  # the retry is rate-limited to once a second
            assert c.get("/info").json()["index"]["reload_error"]  # still broken: still said
        finally:
            info_path.write_bytes(saved)  # repaired: the very files being served
        service._last_retry = 0.0
        info = c.get("/info").json()["index"]
        assert info["reload_error"] is None and info["count"] == 12
        assert c.post("/search", json={"text": "effusion"}).status_code == 200
