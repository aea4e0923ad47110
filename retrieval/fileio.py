"""Atomic file writes (temporary name in the same folder, fsync, rename, fsync the folder), file hashing, and
the clean-up of temporaries that a killed writer leaves behind."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)
CHUNK = 1 << 20


def fsync_dir(path: str | Path) -> None:
    """fsync a folder so that renames and new entries in it survive a power loss (no-op where unsupported)."""
    try:
        fd = os.open(str(path), os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def fsync_file(path: str | Path) -> None:
    """Flush one file's data to disk."""
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside `path`; replaces `path` atomically on success (file and folder fsynced)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        fsync_file(tmp_path)
        os.replace(tmp_path, path)
        fsync_dir(path.parent)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def write_json_atomic(path: str | Path, obj: Any) -> None:
    """Write `obj` as indented JSON, atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")


def sha256_file(path: str | Path) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
    return h.hexdigest()


def sha256_bytes(data: bytes) -> str:
    """Hex sha256 of a byte string."""
    return hashlib.sha256(data).hexdigest()


def clean_temporaries(*folders: str | Path, recursive: bool = False) -> list[Path]:
    """Delete the `.NAME.XXXX.tmp` files that `atomic_path` leaves in `folders` when its writer is killed
    (index builds, train's checkpoint and feature-cache folders); returns them.

    Call it only while holding the folder's writer lock (or where no other writer can be running): a live
    writer's temporary looks the same as a dead one's."""
    removed = []
    for folder in map(Path, folders):
        if not folder.is_dir():
            continue
        for p in folder.glob("**/.*.tmp" if recursive else ".*.tmp"):
            if p.is_file():
                p.unlink(missing_ok=True)
                removed.append(p)
    if removed:
        where = ", ".join(map(str, folders))
        log.info("removed %d temporary file(s) left by an interrupted run in %s", len(removed), where)
    return removed
