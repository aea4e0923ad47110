"""A real `cxr serve` process on 127.0.0.1 (issue 29, items 9 and 11): slow, idle and garbage connections are
closed within the configured times (raw sockets), and SIGTERM drains the requests in flight up to the grace
period, then cancels them and removes the upload folder.

The server is `cli.main.main(["serve", ...])` in a subprocess whose `load_model` gives a FakeModel that sleeps on
a text query "slow SECONDS", so a request can be held in flight.
"""

from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
from repo_paths import HELPERS, REPO

pytest.importorskip("uvicorn", reason="the serve extra is not installed: pip install -e '.[serve]'")

from gen_synth import make_manifest  # noqa: E402
from index_helpers import FakeModel  # noqa: E402

from index.build import BuildOptions, build_index  # noqa: E402

SERVER = textwrap.dedent(
    """
    import sys, time
    sys.path[:0] = [{tests!r}, {repo!r}]
    from index_helpers import FakeModel

    class SlowText(FakeModel):
        def encode_texts(self, texts, batch_size=32, **kw):
            for t in texts:
                if t.startswith("slow "):
                    time.sleep(float(t.split()[1]))
            return super().encode_texts(texts, batch_size, **kw)

    import retrieval.models
    retrieval.models.load_model = lambda name, device=None: SlowText()
    from cli.main import main
    sys.exit(main(["serve", "--index", {index!r}, "--model", "fake", "--no-vlm", "--port", "{port}",
                   "--watch-interval", "0", *{extra!r}]))
    """
)


@pytest.fixture(scope="module")
def index(tmp_path_factory):
    root = tmp_path_factory.mktemp("proc")
    build_index(make_manifest(root, n=8), FakeModel(), root / "idx", options=BuildOptions(workers=0, progress=False))
    return root / "idx"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`cxr serve` in a subprocess with its own TMPDIR (where its upload folder goes)."""

    def __init__(self, index: Path, tmp: Path, *extra: str):
        self.port, self.tmp = free_port(), tmp
        tmp.mkdir(parents=True, exist_ok=True)
        script = SERVER.format(tests=str(HELPERS), repo=str(REPO), index=str(index), port=self.port, extra=extra)
        env = dict(os.environ, TMPDIR=str(tmp), OMP_NUM_THREADS="1")
        self.proc = subprocess.Popen([sys.executable, "-c", script], env=env, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True)  # fmt: skip
        deadline = time.time() + 120
        while time.time() < deadline:
            assert self.proc.poll() is None, self.proc.communicate()[1][-3000:]
            try:
                if self.request("GET", "/health", timeout=2)[0] == 200:
                    return
            except OSError:
                time.sleep(0.2)
        raise AssertionError("the server did not start in 120 s")

    def request(self, method: str, path: str, body: dict | None = None, timeout: float = 30) -> tuple[int, dict]:
        c = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        try:
            data = json.dumps(body).encode() if body is not None else None
            c.request(method, path, body=data, headers={"Content-Type": "application/json"} if data else {})
            r = c.getresponse()
            raw = r.read()
            try:
                return r.status, json.loads(raw or b"{}")
            except ValueError:
                return r.status, {"raw": raw.decode("latin-1")[:200]}
        finally:
            c.close()

    def upload_dirs(self) -> list[str]:
        return sorted(p.name for p in self.tmp.glob("cxr-serve-uploads-*"))

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.communicate()


def closed_after(sock: socket.socket, limit: float, trickle: bytes = b"") -> float | None:
    """Seconds until the server closes `sock` (sending `trickle` a byte at a time every 0.2 s meanwhile), or None
    when it is still open after `limit` seconds. What the server sends before closing is read and dropped."""
    t0 = time.perf_counter()
    sock.settimeout(0.2)
    i = 0
    while time.perf_counter() - t0 < limit:
        try:
            if not sock.recv(4096):
                return time.perf_counter() - t0
        except TimeoutError:
            pass
        except (ConnectionResetError, BrokenPipeError):
            return time.perf_counter() - t0
        if trickle:
            try:
                sock.send(trickle[i % len(trickle) : i % len(trickle) + 1])
            except (ConnectionResetError, BrokenPipeError):
                return time.perf_counter() - t0
            i += 1
    return None


@pytest.mark.slow
def test_slow_idle_and_garbage_connections_are_closed(index, tmp_path):
    server = Server(index, tmp_path / "tmp", "--header-timeout", "1", "--timeout-keep-alive", "1",
                    "--body-timeout", "2")  # fmt: skip
    try:
        port = server.port
        connect = lambda: socket.create_connection(("127.0.0.1", port))  # noqa: E731
        # idle (never a byte) and slow-header connections, 10 of each at once
        idle = [connect() for _ in range(10)]
        slow = [connect() for _ in range(10)]
        head = f"GET /health HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nX-Padding: {'a' * 200}".encode()
        times: dict[str, list] = {"idle": [], "slow header": []}
        threads = [threading.Thread(target=lambda s=s: times["idle"].append(closed_after(s, 6))) for s in idle]
        threads += [
            threading.Thread(target=lambda s=s: times["slow header"].append(closed_after(s, 6, head))) for s in slow
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        for what, got in times.items():
            assert None not in got and max(got) < 4, (what, got)  # 1 s head timeout, with room for a loaded box
        # a slow body: the head arrives, the body a byte at a time: 408 within the body timeout, then closed
        s = connect()
        s.sendall(f"POST /search HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/json\r\n"
                  "Content-Length: 1000\r\n\r\n".encode())  # fmt: skip
        t0 = time.perf_counter()
        answer = b""
        s.settimeout(0.3)
        while time.perf_counter() - t0 < 8 and b"\r\n\r\n" not in answer:
            try:
                s.send(b" ")
                answer += s.recv(4096)
            except TimeoutError:
                continue
            except (ConnectionResetError, BrokenPipeError):
                break
        assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
        assert time.perf_counter() - t0 < 5
        assert closed_after(s, 4, b" ") is not None
        # a keep-alive connection left idle after its response
        s = connect()
        s.sendall(f"GET /health HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\r\n".encode())
        assert s.recv(4096).startswith(b"HTTP/1.1 200")
        got = closed_after(s, 5)
        assert got is not None and got < 4, got
        # 4 KiB of random bytes: a 400 or a close, within the head timeout
        s = connect()
        s.sendall(os.urandom(4096))
        s.settimeout(5)
        t0 = time.perf_counter()
        try:
            reply = s.recv(4096)
        except ConnectionResetError:
            reply = b""
        assert reply == b"" or reply.startswith(b"HTTP/1.1 400"), reply[:100]
        assert time.perf_counter() - t0 < 4
        # a request head over 16 KiB: 400 (h11's limit), not buffered on
        s = connect()
        s.sendall(f"GET /health HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nX-Big: {'a' * 20_000}".encode())
        s.settimeout(5)
        try:
            reply = s.recv(4096)
        except ConnectionResetError:
            reply = b""
        assert reply == b"" or reply.startswith(b"HTTP/1.1 400"), reply[:100]
        # and the server still answers
        assert server.request("GET", "/health")[0] == 200
    finally:
        server.stop()


@pytest.mark.slow
def test_sigterm_drains_requests_in_flight_then_cancels_and_cleans_up(index, tmp_path):
    # a request shorter than the grace period is answered
    server = Server(index, tmp_path / "a", "--grace", "4")
    try:
        assert len(server.upload_dirs()) == 1
        out: dict = {}
        t = threading.Thread(target=lambda: out.update(r=server.request("POST", "/search", {"text": "slow 1.5"})))
        t.start()
        time.sleep(0.5)
        t0 = time.perf_counter()
        server.proc.send_signal(signal.SIGTERM)
        t.join(15)
        assert out["r"][0] == 200 and out["r"][1]["results"]
        server.proc.wait(15)
        assert time.perf_counter() - t0 < 8
        assert server.upload_dirs() == []
    finally:
        server.stop()
    # a request longer than the grace period is cancelled: the server stops anyway and removes its folder
    server = Server(index, tmp_path / "b", "--grace", "2")
    try:
        errors: list = []

        def long_request() -> None:
            try:
                errors.append(server.request("POST", "/search", {"text": "slow 60"}, timeout=60))
            except (OSError, http.client.HTTPException) as e:
                errors.append(e)

        t = threading.Thread(target=long_request)
        t.start()
        time.sleep(0.5)
        t0 = time.perf_counter()
        server.proc.send_signal(signal.SIGTERM)
        server.proc.wait(20)
        took = time.perf_counter() - t0
        assert took < 8, took  # the grace period (2 s) and the shutdown, not the request's 60 s
        assert server.upload_dirs() == []
        t.join(10)
        assert errors and errors[0][0] == 503 and "shutting down" in errors[0][1]["detail"], errors
    finally:
        server.stop()
