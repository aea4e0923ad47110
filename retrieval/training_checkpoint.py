"""One checkpoint scheme for every trainer: a folder whose `state.json` is the commit point.

`commit(state, files)` writes each new file (or folder) under a name that no committed state uses, each one
atomically, then replaces `state.json` (atomic), which names the files of the checkpoint, then removes
everything else in the folder. So at every moment the folder holds one complete checkpoint: the last committed
one (a kill before the commit leaves the previous one, and its stray files go at the next commit). Files can
be carried over from the last checkpoint by naming them again (e.g. the best epoch's weights). `state.json` also
records the sha256 of every file it names (a folder: of its files' paths and contents); a resume reads the state
with `verify=True`, which refuses a changed byte in one line naming the file.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from retrieval.errors import CXRError
from retrieval.fileio import fsync_dir, fsync_file, sha256_file, write_json_atomic

STATE_FILE = "state.json"
SUMS = "sha256"  # state.json's record of each named file's checksum (absent in checkpoints of earlier releases)
Writer = Callable[[Path], None]  # writes one file, or fills one folder, at the path it is given


class Checkpoint:
    """The checkpoint folder of one run. `state()` is the last committed state (None when there is none),
    `path(key)` a file it names; `commit` makes a new one."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)

    def state(self, verify: bool = False) -> dict[str, Any] | None:
        """The committed state; with `verify`, every file it names is checked against its recorded sha256 (what
        a resume does) and a damaged one is a CXRError naming it."""
        path = self.folder / STATE_FILE
        if not path.is_file():
            return None
        try:
            state = json.loads(path.read_text())
            if not isinstance(state.get("files"), dict):
                raise ValueError("it names no files")
        except (OSError, ValueError) as e:
            raise self.error(e) from None
        if verify:
            for name, want in (state.get(SUMS) or {}).items():
                if not (self.folder / name).exists() or entry_sha(self.folder / name) != want:
                    raise CXRError(
                        f"{self.folder / name}: damaged (sha256 mismatch with {STATE_FILE}); cannot resume from it: "
                        "delete the folder or pass fresh=True / --fresh"
                    )
        return state

    def path(self, key: str, state: Mapping[str, Any] | None = None) -> Path | None:
        """The file `key` of `state` (default: the committed one), None when it names none."""
        state = self.state() if state is None else state
        name = (state or {}).get("files", {}).get(key)
        return None if name is None else self.folder / name

    def error(self, e: BaseException) -> CXRError:
        return CXRError(
            f"{self.folder}: cannot resume from the checkpoint ({type(e).__name__}: {e}); "
            "delete the folder or pass fresh=True / --fresh"
        )

    def commit(
        self, state: Mapping[str, Any], write: Mapping[str, tuple[str, Writer]], keep: Mapping[str, str] | None = None
    ) -> dict[str, Any]:
        """Write `write` ({key: (new name, writer)}), then commit `state` naming those files and the carried
        over ones (`keep`: {key: name} already in the folder); returns the committed state."""
        self.folder.mkdir(parents=True, exist_ok=True)
        files = dict(keep or {})
        last = self.state() or {}
        committed = set(last.get("files", {}).values())
        for key, (name, writer) in write.items():
            if name in committed or name == STATE_FILE:
                raise ValueError(f"checkpoint file {name!r} is in use; new files need new names")
            _write_new(self.folder / name, writer)
            files[key] = name
        missing = [n for n in files.values() if not (self.folder / n).exists()]
        if missing:
            raise ValueError(f"checkpoint files {missing} are not in {self.folder}")
        known = last.get(SUMS) or {}
        sums = {n: known[n] if n in known and n in (keep or {}).values() else entry_sha(self.folder / n)
                for n in files.values()}  # fmt: skip
        out = {**state, "files": files, SUMS: sums}
        write_json_atomic(self.folder / STATE_FILE, out)  # the commit point
        for entry in self.folder.iterdir():
            if entry.name != STATE_FILE and entry.name not in files.values():
                shutil.rmtree(entry) if entry.is_dir() and not entry.is_symlink() else entry.unlink(missing_ok=True)
        return out


def entry_sha(path: Path) -> str:
    """sha256 of a file, or of a folder's files (their relative paths and contents, in sorted order)."""
    if not path.is_dir():
        return sha256_file(path)
    h = hashlib.sha256()
    for f in sorted(p for p in path.rglob("*") if p.is_file()):
        h.update(f"{f.relative_to(path).as_posix()}\0{sha256_file(f)}\n".encode())
    return h.hexdigest()


def _write_new(path: Path, writer: Writer) -> None:
    """`writer` makes a file or a folder at a temporary path beside `path`; it is fsynced and renamed to `path`."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)  # a stray of a killed run (no committed state names it)
    tmp_dir = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    tmp = tmp_dir / path.name
    try:
        writer(tmp)
        for f in [tmp] if tmp.is_file() else sorted(p for p in tmp.rglob("*") if p.is_file()):
            fsync_file(f)
        os.replace(tmp, path)
        fsync_dir(path.parent)
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)
