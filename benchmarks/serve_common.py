"""Shared by the serve benchmarks, the viewer screenshot and tests/system/test_browser.py: start `cxr serve` on a
free loopback port, stop it; drive the viewer in Debian's headless Chromium."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# Debian's Chromium, headless, with nothing that reaches the network by itself.
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def free_port() -> int:
    """A TCP port nothing listens on now (loopback)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(
    args: list[str], log: Path, timeout: float = 300, tmp: Path | None = None
) -> tuple[subprocess.Popen, str]:
    """`cxr serve ARGS --host 127.0.0.1 --port FREE` as a child process (its temporary files under `tmp` when
    given); (process, base URL) once /health answers."""
    import httpx

    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    if tmp is not None:
        env["TMPDIR"] = str(tmp)
    cmd = [sys.executable, "-m", "cli.main", "serve", *args, "--host", "127.0.0.1", "--port", str(port)]
    log.parent.mkdir(parents=True, exist_ok=True)
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log.open("wb"), stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"cxr serve exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(0.25)
    proc.kill()
    raise RuntimeError(f"cxr serve did not answer within {timeout} s:\n{log.read_text()[-3000:]}")


def stop_server(proc: subprocess.Popen) -> None:
    """SIGTERM (uvicorn shuts down gracefully), SIGKILL after 20 s."""
    proc.terminate()
    try:
        proc.wait(20)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)


def wait_js(page, fn: str, timeout: float = 120) -> object:
    """Poll `fn` (a JS function) in a playwright page until it returns something truthy, and return that. Not
    `wait_for_function`: that evaluates a string with eval, which the viewer's Content-Security-Policy (rightly)
    refuses."""
    deadline = time.time() + timeout
    while True:
        got = page.evaluate(fn)
        if got:
            return got
        if time.time() > deadline:
            raise TimeoutError(f"timed out after {timeout} s waiting for {fn}")
        time.sleep(0.1)


def rss_mib(pid: int) -> float:
    """Resident memory of a process, MiB."""
    import psutil

    return psutil.Process(pid).memory_info().rss / 2**20


def load_avg() -> float:
    """1-minute load average, recorded beside every figure (the machine is shared)."""
    return round(os.getloadavg()[0], 2)
