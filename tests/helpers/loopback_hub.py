"""A loopback Hugging Face hub for the tests (no tests here): `LoopbackHub(repos)` serves the hub's model-info, tree
and `resolve/` endpoints from 127.0.0.1 for the repos given as {repo: {path: bytes}}, with the commit and ETag
headers huggingface_hub reads, and logs each request; `prefetch_through_hub` runs `cxr models prefetch` against it."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import threading
from collections.abc import Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlparse

from repo_paths import REPO


def _git_blob_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


class LoopbackHub:
    """A bounded HTTP server on 127.0.0.1 answering the hub endpoints snapshot_download calls; logs each request."""

    def __init__(self, repos: dict[str, dict[str, bytes]], lifetime_s: float = 180.0):
        self.repos = {r: {"commit": hashlib.sha1(r.encode()).hexdigest(), "files": f} for r, f in repos.items()}
        self.requests: list[str] = []
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:  # quiet
                pass

            def _send(self, code: int, body: bytes, headers: dict[str, str], head: bool) -> None:
                self.send_response(code)
                for k, v in {"Content-Length": str(len(body)), **headers}.items():
                    self.send_header(k, v)
                self.end_headers()
                if not head:
                    self.wfile.write(body)

            def _route(self, head: bool) -> None:
                path = unquote(urlparse(self.path).path)
                hub.requests.append(f"{self.command} {path}")
                parts = path.strip("/").split("/")
                if parts[:2] == ["api", "models"] and len(parts) >= 4:  # /api/models/REPO[/revision|tree/REV]
                    repo, what = "/".join(parts[2:4]), (parts[4] if len(parts) > 4 else "revision")
                    entry = hub.repos.get(repo)
                    if entry is None:
                        return self._send(404, b"{}", {"X-Error-Code": "RepoNotFound"}, head)
                    files = entry["files"]
                    if what == "revision":
                        body = {
                            "id": repo,
                            "modelId": repo,
                            "sha": entry["commit"],
                            "private": False,
                            "siblings": [{"rfilename": p} for p in files],
                        }
                    elif what == "tree":
                        body = [
                            {"type": "file", "oid": _git_blob_sha1(d), "size": len(d), "path": p}
                            for p, d in files.items()
                        ]
                    else:
                        return self._send(404, b"{}", {}, head)
                    return self._send(200, json.dumps(body).encode(), {"Content-Type": "application/json"}, head)
                if len(parts) >= 5 and parts[2] == "resolve":
                    repo, file = "/".join(parts[:2]), "/".join(parts[4:])
                    entry = hub.repos.get(repo)
                    if entry is None or file not in entry["files"]:
                        return self._send(404, b"not found", {"X-Error-Code": "EntryNotFound"}, head)
                    data = entry["files"][file]
                    headers = {
                        "X-Repo-Commit": entry["commit"],
                        "ETag": f'"{_git_blob_sha1(data)}"',
                        "Content-Type": "application/octet-stream",
                    }
                    return self._send(200, data, headers, head)
                return self._send(404, b"not found", {}, head)

            def do_GET(self) -> None:  # noqa: N802 - http.server's naming
                self._route(head=False)

            def do_HEAD(self) -> None:  # noqa: N802
                self._route(head=True)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self._thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True)
        self._timer = threading.Timer(lifetime_s, self.stop)  # stops by itself even if a test hangs
        self._timer.daemon = True

    def __enter__(self) -> LoopbackHub:
        self._thread.start()
        self._timer.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def stop(self) -> None:
        self._timer.cancel()
        if self._thread.is_alive():
            self.server.shutdown()
        self.server.server_close()


def hub_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "TRANSFORMERS_"))}
    return (
        env
        | {
            "PYTHONPATH": str(REPO),
            "TOKENIZERS_PARALLELISM": "false",
            "HF_HUB_DISABLE_TELEMETRY": "1",
            "HF_HUB_DISABLE_PROGRESS_BARS": "1",
        }
        | extra
    )


def prefetch_through_hub(repos: dict, names: Sequence[str], dest: Path, hf_home: Path) -> list[str]:
    """`cxr models prefetch NAME --to dest/NAME` for each name against a loopback hub serving `repos`; asserts each
    exits 0 and returns the paths the hub was asked for."""
    with LoopbackHub(repos) as hub:
        for name in names:
            run = subprocess.run(
                [sys.executable, "-m", "cli.main", "models", "prefetch", name, "--to", str(dest / name)],
                env=hub_env(HF_ENDPOINT=hub.url, HF_HOME=str(hf_home), HF_HUB_DISABLE_XET="1"),
                capture_output=True,
                text=True,
                timeout=240,
                cwd=REPO,
            )
            assert run.returncode == 0, run.stderr[-2000:]
        return list(hub.requests)
