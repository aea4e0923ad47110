"""`python -c CODE ARGS` in a child process for the tests that must see a fresh interpreter (offline loading with an
empty cache, which modules an import pulls in, other library versions) (no tests here)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path


def run_python(
    code: str, *args: str, env: dict[str, str] | None = None, timeout: float = 240, cwd: Path | None = None
) -> subprocess.CompletedProcess:
    """Runs `code` with `args` as sys.argv[1:]; asserts it exits 0 (the tail of its stderr in the message) and returns
    the finished process, its stdout and stderr as text."""
    run = subprocess.run(
        [sys.executable, "-c", code, *map(str, args)], env=env, capture_output=True, text=True, timeout=timeout, cwd=cwd
    )
    assert run.returncode == 0, run.stderr[-3000:]
    return run
