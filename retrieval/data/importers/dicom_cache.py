"""The content-addressed cache of fetched DICOM instances (importers/dicomweb.py, index/dicomweb_sync.py).

Layout of the folder: `objects/ab/<sha256 of the bytes>.dcm` (each written under a temporary name, then renamed),
`instances.jsonl` (one line per instance, {"sop": UID, "sha256": hex}, appended after its file is in place), and
`cache_info.json` (what the cache was made with: the pseudonymisation key's check value, never the key).

A killed fetcher leaves at worst a torn last line (ignored when read) and a file without its line (fetched again);
every line read names a complete file, so a rerun never fetches a mapped instance twice. `get` checks that the
file is there and, once per process, that its bytes still hash to its name: a changed file, or one a power cut
left incomplete, is fetched again. That check is why nothing here is fsynced (fsync took half of a fetch's time,
benchmarks/results/dicomweb_cpu.md): the content address already tells a whole file from a broken one.
"""

from __future__ import annotations

import json
import os
import tempfile
import threading
from pathlib import Path

from retrieval.data.pseudonym import Pseudonymizer
from retrieval.errors import ImportError_
from retrieval.fileio import clean_temporaries, sha256_bytes, sha256_file, write_json_atomic

MAP_FILE = "instances.jsonl"
INFO_FILE = "cache_info.json"
KEY_CHECK = "cxr-cache-key-check"


def key_check(pseudonymize: Pseudonymizer | None) -> str:
    """A value that tells two keys apart without revealing either ('' without pseudonymisation)."""
    return pseudonymize(KEY_CHECK, "KeyCheck") if pseudonymize is not None else ""


class InstanceCache:
    """SOP Instance UID -> cached DICOM file, content-addressed; safe to share between fetch threads."""

    def __init__(self, folder: str | Path, pseudonymize: Pseudonymizer | None = None):
        self.folder = Path(folder)
        self.objects = self.folder / "objects"
        self.objects.mkdir(parents=True, exist_ok=True)
        self._check_info(key_check(pseudonymize))
        clean_temporaries(self.folder, self.objects, recursive=True)
        self._lock = threading.Lock()
        self._verified: set[str] = set()
        self.map: dict[str, str] = self._read_map()

    def _check_info(self, check: str) -> None:
        info_path = self.folder / INFO_FILE
        if info_path.is_file():
            recorded = json.loads(info_path.read_text()).get("pseudonym_check", "")
            if recorded != check:
                made = "a pseudonymisation key" if recorded else "no pseudonymisation"
                raise ImportError_(f"{self.folder}: this cache was made with {made} and this run asks for another "
                                   "(or none); use another --cache folder")  # fmt: skip
        else:
            write_json_atomic(info_path, {"format": 1, "pseudonym_check": check})

    def _read_map(self) -> dict[str, str]:
        out: dict[str, str] = {}
        path = self.folder / MAP_FILE
        if not path.is_file():
            return out
        text = path.read_text(errors="replace")
        if text and not text.endswith("\n"):  # a torn last line: end it, so the next line starts clean
            with open(path, "a", encoding="utf-8") as f:
                f.write("\n")
        for line in text.splitlines():
            try:
                rec = json.loads(line)
                out[str(rec["sop"])] = str(rec["sha256"])
            except (ValueError, KeyError, TypeError):
                continue  # a torn last line after a kill
        return out

    def path_of(self, digest: str) -> Path:
        return self.objects / digest[:2] / f"{digest}.dcm"

    def get(self, sop: str) -> Path | None:
        """The cached file of `sop`, or None when it was never fetched or its file is gone or changed."""
        digest = self.map.get(sop)
        if digest is None:
            return None
        path = self.path_of(digest)
        if not path.is_file():
            return None
        if digest not in self._verified:
            if sha256_file(path) != digest:
                return None
            self._verified.add(digest)
        return path

    def put(self, sop: str, data: bytes) -> Path:
        """Store the bytes of `sop` (once per content) and record the mapping; returns the file."""
        digest = sha256_bytes(data)
        path = self.path_of(digest)
        if not path.is_file() or sha256_file(path) != digest:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
            try:
                with os.fdopen(fd, "wb") as f:
                    f.write(data)
                os.replace(tmp, path)
            finally:
                if os.path.exists(tmp):
                    os.unlink(tmp)
        line = json.dumps({"sop": sop, "sha256": digest}) + "\n"
        with self._lock:
            with open(self.folder / MAP_FILE, "a", encoding="utf-8") as f:
                f.write(line)
            self.map[sop] = digest
            self._verified.add(digest)
        return path
