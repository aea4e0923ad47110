"""The index folder: a chain of checksummed generations behind an atomically switched `CURRENT` pointer.

    IDX/CURRENT                  "gen-000002 <sha256 of gen-000002/index_info.json>" (renamed into place)
    IDX/gen-000002/images.faiss  one image vector per manifest row that could be read (row id = position)
    IDX/gen-000002/reports.faiss one report vector per image row, same row ids
    IDX/gen-000002/meta.parquet  row id -> image_id, study_id, patient_id, image_path, view, report, labels, ...
    IDX/gen-000002/index_info.json  factory, metric, dim, count, model, versions, and size + sha256 of every file
    IDX/gen-000002/bad_images.csv   rows skipped while building (row, image_id, path, reason), when any
    IDX/gen-000002/.readers      read-lock file: readers hold a shared flock while opening (mmap: while open)
    IDX/.lock                    the writer lock (one build/add/gc at a time)

Why (LevelDB/RocksDB style): a writer never changes a file a reader may be reading. Each build or add writes a
complete new generation beside the current one, fsyncs its files and folder, re-hashes them, and only then
renames a new `CURRENT` into place. Readers resolve the pointer once and read one consistent generation; the
pointer carries the info file's sha256 and the info carries every other file's size and sha256, so a damaged or
swapped file is refused with one line naming it. Superseded generations are removed when no reader holds their
lock (after each commit, and by `cxr index gc`).

Opening checks the pointer, the typed info schema (pydantic), every file's size and a hash of its first and last
64 KiB, the full hash of meta.parquet (it is read in full anyway), and, for generations up to
`FULL_HASH_AT_OPEN` bytes, the full hash of every file; above that (and with `--mmap`) the FAISS files are hashed
in a background thread and no search answers before it has matched (`CXRIndex.ensure_intact`). `verify_index`
(`cxr index verify`) always hashes everything. Folders written before generations (files at the top level, no
`CURRENT`) still open, without checksums; the next `add` turns them into a generation.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from index.layout import (
    BAD_COLUMNS,
    BAD_FILE,
    CURRENT_FILE,
    IMAGES_FILE,
    INFO_FILE,
    META_FILE,
    POINTER_RE,
    READ_LOCK,
    REPORTS_FILE,
    BackgroundHash,
    check_files,
    generation_dirs,
    lost_pointer,
    newest_intact,
    read_meta_bytes,
    validate_info,
)
from retrieval.errors import IndexError_, UsageError

log = logging.getLogger(__name__)

FULL_HASH_AT_OPEN = int(os.environ.get("CXR_FULL_HASH_AT_OPEN", 256 * 2**20))


@dataclass
class CXRIndex:
    """An opened index generation: the two FAISS indexes (CPU), the row metadata and the info record."""

    path: Path
    images: Any  # faiss.Index
    reports: Any  # faiss.Index
    meta: pd.DataFrame
    info: dict
    mmap: bool = False
    read_lock: Any = None  # the open `.readers` file an mmap-opened index holds its shared lock through
    generation: str = ""
    gen_dir: Path | None = None
    pending: BackgroundHash | None = None  # the full hash a quick open left running

    def ensure_intact(self) -> None:
        """Wait for the background hash of a quick open (if any); an IndexError_ once a file does not match."""
        if self.pending is not None:
            self.pending.wait()

    @property
    def count(self) -> int:
        """Number of rows (images) in the index."""
        return int(self.images.ntotal)

    @property
    def dim(self) -> int:
        """Vector dimension."""
        return int(self.images.d)

    def target(self, name: str) -> Any:
        """The FAISS index searched for `name` ('images' or 'reports')."""
        if name == "images":
            return self.images
        if name == "reports":
            return self.reports
        raise UsageError(f"target must be 'images' or 'reports', got {name!r}")

    def file(self, target: str) -> Path:
        """The file behind a search target (for error messages)."""
        return (self.gen_dir or self.path) / (IMAGES_FILE if target == "images" else REPORTS_FILE)

    @property
    def model_path(self) -> str | None:
        """The folder of the model that built this index, when it is recorded and still exists."""
        return recorded_model_path(self.info)

    def load_model(self, device: str | None = None) -> Any:
        """The model that built this index, from its recorded folder (`load_recorded_model`)."""
        return load_recorded_model(self.info, self.path, device=device)

    def close(self) -> None:
        """Release the read lock an mmap-opened index holds (no-op otherwise)."""
        lock, self.read_lock = self.read_lock, None
        if lock is not None:
            lock.close()


def model_record(model: Any, model_path: str | Path | None = None) -> dict:
    """The model part of index_info.json: name, fingerprint, embed dim and (when known) its folder."""
    rec = {
        "name": str(getattr(model, "name", "unknown")),
        "fingerprint": str(model.fingerprint),
        "embed_dim": int(model.embed_dim),
    }
    if model_path is not None and Path(model_path).is_dir():
        rec["path"] = str(Path(model_path).resolve())
    return rec


def check_model(info: dict, model: Any, where: str | Path = "") -> None:
    """Refuse a model whose fingerprint differs from the index's (its vectors would not be comparable)."""
    rec = info.get("model", {})
    want, got = rec.get("fingerprint"), str(getattr(model, "fingerprint", None))
    if want != got:
        raise IndexError_(
            f"{where}: index was built with model {rec.get('name')!r} (fingerprint {want}), "
            f"but the given model is {getattr(model, 'name', '?')!r} (fingerprint {got}); "
            "rebuild the index with this model or pass the model it was built with"
        )


def recorded_model_path(info: dict) -> str | None:
    """The model folder index_info.json records, when it still exists (else None)."""
    path = (info.get("model") or {}).get("path")
    return str(path) if path and Path(path).is_dir() else None


def recorded_model_name(info: dict, where: str | Path, override: str | None = None) -> str:
    """What to load for an index: `override` when given, else the recorded model folder; a usage error naming
    `--model` when the index records none that still exists."""
    if override:
        return str(override)
    path = recorded_model_path(info)
    if path is not None:
        return path
    rec = info.get("model") or {}
    recorded = rec.get("path")
    raise UsageError(
        f"{where}: pass --model (the index was built with {rec.get('name')!r}"
        + (f" from {recorded}, which no longer exists)" if recorded else ", whose folder was not recorded)")
    )


def load_recorded_model(info: dict, where: str | Path, override: str | None = None, device: str | None = None) -> Any:
    """The one place that loads the model an index was built with (`recorded_model_name`), on `device`
    (None or "auto": CUDA when there). Opening the index with it checks its fingerprint."""
    from retrieval.models import load_model

    return load_model(recorded_model_name(info, where, override), device=device)


BUSY = object()


def shared_lock(gen_dir: Path) -> Any:
    """A shared flock on the generation's `.readers` file: the open file, None when there is no lock file
    (a read-only copy, or the generation is gone), or BUSY while a gc holds it exclusively."""
    import fcntl

    try:
        f = open(gen_dir / READ_LOCK, "rb")
    except OSError:
        return None
    try:
        fcntl.flock(f, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError:
        f.close()
        return BUSY
    return f


@dataclass
class Ref:
    """Where an index folder's current generation is: its folder, name and the info sha256 the pointer holds."""

    root: Path
    gen_dir: Path
    name: str
    info_sha: str | None  # None: a folder written before generations

    @property
    def info_path(self) -> Path:
        return self.gen_dir / INFO_FILE


def read_pointer(root: Path) -> tuple[str, str] | None:
    """(generation name, info sha256) from CURRENT, None when there is none; a damaged pointer is an error."""
    p = root / CURRENT_FILE
    try:
        raw = p.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as e:
        raise lost_pointer(root, f"unreadable ({e.strerror or e})") from None
    m = POINTER_RE.match(raw.decode("ascii", "replace")) if len(raw) < 200 else None
    if not m:
        raise lost_pointer(root, "damaged pointer (expected 'gen-NNNNNN <sha256>')")
    return m.group(1), m.group(2)


def resolve(index_dir: str | Path) -> Ref:
    """Resolve an index folder to its current generation (or to itself for a folder without generations)."""
    root = Path(index_dir)
    if not root.is_dir():
        raise IndexError_(f"{root}: no index folder here")
    pointer = read_pointer(root)
    if pointer is not None:
        name, sha = pointer
        gen = root / name
        if not gen.is_dir():
            raise lost_pointer(root, f"points to {name}, which is missing")
        return Ref(root, gen, name, sha)
    if (root / INFO_FILE).is_file():
        return Ref(root, root, "", None)
    if generation_dirs(root) and newest_intact(root) is not None:
        raise lost_pointer(root, "missing")
    hint = ""
    if (root / ".build").is_dir():
        hint = " (an unfinished build: rerun `cxr index build`)"
    raise IndexError_(f"{root / INFO_FILE}: missing, not an index folder{hint}")


def has_index(index_dir: str | Path) -> bool:
    """True when the folder holds a committed index (a CURRENT pointer, or a pre-generation info file)."""
    root = Path(index_dir)
    return (root / CURRENT_FILE).exists() or (root / INFO_FILE).exists()


def load_info(ref: Ref) -> dict:
    path = ref.info_path
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise IndexError_(f"{path}: missing") from None
    except OSError as e:
        raise IndexError_(f"{path}: unreadable ({e.strerror or e})") from None
    if ref.info_sha is not None and hashlib.sha256(raw).hexdigest() != ref.info_sha:
        raise IndexError_(f"{path}: damaged, sha256 differs from the one {CURRENT_FILE} records")
    try:
        info = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
        raise IndexError_(f"{path}: unreadable ({str(e)[:120]})") from None
    validate_info(info, path)
    if ref.info_sha is not None and info.get("files") is None:
        raise IndexError_(f"{path}: corrupt, missing 'files' (the checksums of the generation)")
    return info


def read_info(index_dir: str | Path) -> dict:
    """The checked info record of the current generation; a missing, damaged or mistyped one is an IndexError_."""
    return load_info(resolve(index_dir))


def _is_ivf(index: Any) -> bool:
    import faiss

    try:
        faiss.extract_index_ivf(index)
        return True
    except RuntimeError:
        return False


def read_faiss(path: Path, mmap: bool = False) -> Any:
    """Read one FAISS file; `mmap` memory-maps what faiss can map: the inverted lists of IVF-Flat / IVF-PQ
    (not the block lists of 4-bit fast-scan PQ, which are small), and the exact vectors of an `,RFlat` re-rank
    (IO_FLAG_MMAP_IFC), which are most of a re-ranked index's bytes. Pages are read on demand by the OS."""
    import faiss

    if not path.is_file():
        raise IndexError_(f"{path}: missing")
    with open(path, "rb") as f:
        head = f.read(4)
    if len(head) < 4 or not all(48 <= b < 123 for b in head):
        raise IndexError_(f"{path}: corrupt FAISS file (no FAISS header)")
    try:
        if not mmap:
            return faiss.read_index(str(path), 0)
        try:  # inverted lists and flat codes (the exact vectors of an RFlat re-rank) both mapped
            return faiss.read_index(str(path), faiss.IO_FLAG_MMAP | faiss.IO_FLAG_MMAP_IFC)
        except RuntimeError:  # faiss maps flat codes only where no inverted lists are mapped (IVF-Flat)
            return faiss.read_index(str(path), faiss.IO_FLAG_MMAP)
    except (RuntimeError, MemoryError) as e:
        raise IndexError_(f"{path}: corrupt FAISS file ({str(e).splitlines()[0][:160]})") from e


def open_generation(ref: Ref, model: Any, mmap: bool, full: bool | None) -> CXRIndex:
    info = load_info(ref)
    root, gen = ref.root, ref.gen_dir
    if model is not None:
        check_model(info, model, root)
    if mmap and "IVF" not in info["factory"]:
        raise UsageError(
            f"--mmap works for IVF indexes only (they keep their inverted lists on disk); "
            f"{root} is {info['factory']!r}: drop --mmap or rebuild with an IVF factory"
        )
    files = info.get("files")
    pending = None
    if full is None:
        full = not mmap and sum(r["size"] for r in (files or {}).values()) <= FULL_HASH_AT_OPEN
        pending = None if full or not files else BackgroundHash(gen, info, (IMAGES_FILE, REPORTS_FILE))
    check_files(gen, info, full, skip_full=(META_FILE,))  # meta is hashed as it is read, below
    images = read_faiss(gen / IMAGES_FILE, mmap)
    reports = read_faiss(gen / REPORTS_FILE, mmap)
    if mmap and not _is_ivf(images):
        raise UsageError(f"--mmap works for IVF indexes only; {gen / IMAGES_FILE} is not IVF")
    meta = read_meta_bytes(gen / META_FILE, files.get(META_FILE) if files else None)
    n = int(info["count"])
    counts = {IMAGES_FILE: int(images.ntotal), REPORTS_FILE: int(reports.ntotal), META_FILE: len(meta)}
    wrong = {k: v for k, v in counts.items() if v != n}
    if wrong:
        first = next(iter(wrong))
        raise IndexError_(
            f"{gen / first}: inconsistent index, {INFO_FILE} says {n} rows but "
            + ", ".join(f"{k} has {v}" for k, v in wrong.items())
        )
    for name, idx in ((IMAGES_FILE, images), (REPORTS_FILE, reports)):
        if idx.d != info["dim"]:
            raise IndexError_(f"{gen / name}: vector dimension differs from {INFO_FILE} ({idx.d} vs {info['dim']})")
    if not np.array_equal(meta["row_id"].to_numpy(), np.arange(n)):
        raise IndexError_(f"{gen / META_FILE}: corrupt, row_id is not 0..{n - 1}")
    return CXRIndex(
        path=root, images=images, reports=reports, meta=meta, info=info, mmap=mmap, generation=ref.name, gen_dir=gen,
        pending=pending,
    )  # fmt: skip


def open_index(index_dir: str | Path, model: Any = None, mmap: bool = False, full: bool | None = None) -> CXRIndex:
    """Open the current generation for search; refuse a model of another fingerprint and damaged files.

    Holds a shared read lock on the generation while opening (for an mmap index, until `close()`), so a gc
    never removes it under the reader. `full` forces (True) or skips (False) the full hash of every file;
    by default it runs for generations up to FULL_HASH_AT_OPEN bytes."""
    last: IndexError_ | None = None
    for attempt in range(100):
        ref = resolve(index_dir)
        if ref.info_sha is None:  # pre-generation folder: nothing to lock
            return open_generation(ref, model, mmap, full)
        lock = shared_lock(ref.gen_dir)
        if lock is BUSY or (lock is None and not ref.info_path.is_file()):
            time.sleep(0.005 * (1 + attempt % 10))  # a gc is removing it: CURRENT has moved on already
            continue
        try:
            idx = open_generation(ref, model, mmap, full)
        except IndexError_ as e:
            if lock is not None:
                lock.close()
            if read_pointer(ref.root) not in (None, (ref.name, ref.info_sha)):
                last = e  # a writer committed meanwhile: read the new generation
                continue
            raise
        if mmap and lock is not None:
            idx.read_lock = lock
        elif lock is not None and idx.pending is not None:
            idx.pending.hold(lock)  # no gc removes the files while the background hash reads them
        elif lock is not None:
            lock.close()
        return idx
    raise last or IndexError_(f"{index_dir}: could not get a stable generation to read (a writer is very busy)")


def read_bad(index_dir: str | Path) -> pd.DataFrame:
    """The skipped images of an index's current generation (empty when there were none)."""
    p = resolve(index_dir).gen_dir / BAD_FILE
    if not p.is_file():
        return pd.DataFrame(columns=BAD_COLUMNS)
    try:
        return pd.read_csv(p, dtype=str, keep_default_na=False)
    except Exception as e:
        raise IndexError_(f"{p}: corrupt ({type(e).__name__})") from None
