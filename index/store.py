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
`FULL_HASH_AT_OPEN` bytes, the full hash of every file. `verify_index` (`cxr index verify`) always hashes
everything. Folders written before generations (files at the top level, no `CURRENT`) still open, without
checksums; the next `add` turns them into a generation.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import errno
import hashlib
import io
import json
import logging
import os
import re
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from retrieval.errors import IndexError_, UsageError
from retrieval.fileio import atomic_path, clean_temporaries, fsync_dir, fsync_file, sha256_file

log = logging.getLogger(__name__)

IMAGES_FILE = "images.faiss"
REPORTS_FILE = "reports.faiss"
META_FILE = "meta.parquet"
INFO_FILE = "index_info.json"
BAD_FILE = "bad_images.csv"
CURRENT_FILE = "CURRENT"
READ_LOCK = ".readers"
LOCK_FILE = ".lock"
GEN_PREFIX = "gen-"
FORMAT_VERSION = 2
METRIC = "inner_product"
QUICK_BYTES = 64 * 1024
FULL_HASH_AT_OPEN = int(os.environ.get("CXR_FULL_HASH_AT_OPEN", 256 * 2**20))
META_COLUMNS = [
    "row_id",
    "image_id",
    "study_id",
    "patient_id",
    "image_path",
    "view",
    "report",
    "labels",
    "split",
    "source",
    "has_report",
]
BAD_COLUMNS = ["row", "image_id", "path", "reason"]
_GEN_RE = re.compile(r"^gen-(\d{6,})$")
_POINTER_RE = re.compile(r"\A(gen-\d{6,}) ([0-9a-f]{64})\n\Z")  # exactly as written: any change is damage


# ----------------------------------------------------------------------------------------- info schema


class FileRecord(BaseModel):
    """Size and hashes of one file of a generation (`quick` = sha256 of its first and last 64 KiB)."""

    model_config = ConfigDict(extra="forbid", strict=True)
    size: int = Field(ge=0)
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    quick: str = Field(pattern=r"^[0-9a-f]{64}$")


class ModelRecord(BaseModel):
    """The model an index was built with; its fingerprint must match at query time."""

    model_config = ConfigDict(extra="allow", strict=True)
    name: str | None = None
    fingerprint: str
    embed_dim: int | None = Field(default=None, ge=1)
    path: str | None = None


class SearchRecord(BaseModel):
    """The query parameters tuned at build time for one FAISS file (index/tune.py) and the recall they measured.

    Indexes written before tuning have no `search` record: they open as before, with faiss's defaults."""

    model_config = ConfigDict(extra="allow", strict=True)
    params: dict[Literal["efSearch", "nprobe", "k_factor"], int] = Field(default_factory=dict)
    recall: float = Field(ge=0, le=1)
    target: float = Field(gt=0, le=1)
    k: int = Field(default=10, ge=1)
    queries: int = Field(default=0, ge=0)
    met: bool = True
    method: str = "measured"
    sample: str | None = None


class InfoSchema(BaseModel):
    """index_info.json, typed: a wrong type is refused with the field's name instead of a traceback later."""

    model_config = ConfigDict(extra="allow", strict=True)
    factory: str = Field(min_length=1)
    count: int = Field(ge=0)
    dim: int = Field(ge=1)
    model: ModelRecord
    metric: Literal["inner_product"] = METRIC
    format_version: int = Field(default=1, ge=1, le=FORMAT_VERSION)
    normalized: bool = True
    generation: int | None = Field(default=None, ge=1)
    files: dict[str, FileRecord] | None = None
    bad_images: int = Field(default=0, ge=0)
    manifests: list[dict[str, Any]] = Field(default_factory=list)
    versions: dict[str, str] = Field(default_factory=dict)
    created: str | None = None
    updated: str | None = None
    reports: str | None = None
    search: dict[Literal["images", "reports"], SearchRecord] | None = None


def validate_info(info: Any, where: str | Path) -> dict:
    """Check `info` against the schema; the first problem becomes one line naming the file and the field."""
    if not isinstance(info, dict):
        raise IndexError_(f"{where}: corrupt, expected a JSON object, got {type(info).__name__}")
    try:
        InfoSchema.model_validate(info)
    except ValidationError as e:
        err = e.errors()[0]
        loc = ".".join(str(p) for p in err["loc"])
        if err["type"] == "missing":
            raise IndexError_(f"{where}: corrupt, missing {loc!r}") from None
        value = repr(err.get("input"))[:60]
        raise IndexError_(f"{where}: corrupt, {loc!r} is {value} ({err['msg'].lower()})") from None
    return info


# ----------------------------------------------------------------------------------------- records


@dataclass
class CXRIndex:
    """An opened index generation: the two FAISS indexes (CPU), the row metadata and the info record."""

    path: Path
    images: Any  # faiss.Index
    reports: Any  # faiss.Index
    meta: pd.DataFrame
    info: dict
    mmap: bool = False
    extra: dict = field(default_factory=dict)
    generation: str = ""
    gen_dir: Path | None = None

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

    def close(self) -> None:
        """Release the read lock an mmap-opened index holds (no-op otherwise)."""
        lock = self.extra.pop("read_lock", None)
        if lock is not None:
            lock.close()


def versions() -> dict:
    """Library versions recorded in index_info.json (what built the index)."""
    import importlib.metadata as md

    import faiss
    import torch

    try:
        package = md.version("cxr-retrieval")
    except md.PackageNotFoundError:
        package = "unknown"
    return {
        "faiss": faiss.__version__,
        "torch": torch.__version__,
        "numpy": np.__version__,
        "pandas": pd.__version__,
        "cxr-retrieval": package,
    }


def now_iso() -> str:
    """Current UTC time, ISO 8601, seconds precision."""
    return _dt.datetime.now(_dt.UTC).replace(microsecond=0).isoformat()


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


# ----------------------------------------------------------------------------------------- hashing


def quick_hash(path: Path, size: int | None = None) -> str:
    """sha256 of the size, the first and the last QUICK_BYTES of a file: catches truncation, swapped files and
    header damage at a constant cost."""
    size = path.stat().st_size if size is None else size
    h = hashlib.sha256(str(size).encode())
    with open(path, "rb") as f:
        h.update(f.read(QUICK_BYTES))
        if size > QUICK_BYTES:
            f.seek(max(QUICK_BYTES, size - QUICK_BYTES))
            h.update(f.read(QUICK_BYTES))
    return h.hexdigest()


def file_record(path: Path) -> dict:
    """{size, sha256, quick} of one file."""
    size = path.stat().st_size
    return {"size": size, "sha256": sha256_file(path), "quick": quick_hash(path, size)}


def check_files(gen_dir: Path, info: dict, full: bool, skip_full: tuple[str, ...] = ()) -> None:
    """Refuse a generation whose files are missing, extra, resized or (by hash) changed; names the file."""
    files = info.get("files")
    if files is None:  # a folder written before generations: no checksums to check
        return
    unknown = sorted(set(files) - {IMAGES_FILE, REPORTS_FILE, META_FILE, BAD_FILE})
    if unknown:  # never follow a name the info file makes up (e.g. '../../etc/passwd')
        raise IndexError_(f"{gen_dir / INFO_FILE}: corrupt, lists unknown file {unknown[0][:60]!r}")
    for name, rec in files.items():
        p = gen_dir / name
        if not p.is_file():
            raise IndexError_(f"{p}: missing (index_info.json lists it)")
        size = p.stat().st_size
        if size != rec["size"]:
            raise IndexError_(f"{p}: damaged, {size} bytes where index_info.json records {rec['size']}")
        if quick_hash(p, size) != rec["quick"]:
            raise IndexError_(f"{p}: damaged, checksum mismatch (header or tail); run `cxr index verify`")
        if full and name not in skip_full and sha256_file(p) != rec["sha256"]:
            raise IndexError_(f"{p}: damaged, sha256 mismatch with index_info.json")
    for name in (IMAGES_FILE, REPORTS_FILE, META_FILE):
        if name not in files:
            raise IndexError_(f"{gen_dir / INFO_FILE}: corrupt, no checksum recorded for {name}")


# ----------------------------------------------------------------------------------------- locks


@contextlib.contextmanager
def writer_lock(folder: Path) -> Iterator[None]:
    """Hold an exclusive lock on `folder` so that two builds/adds/gcs never write it at once. A POSIX record lock:
    it belongs to this process only (forked DataLoader workers do not inherit it) and the OS drops it when the
    process dies (SIGKILL included), so a rerun after a kill is never blocked."""
    import fcntl

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / LOCK_FILE, "a") as f:
        try:
            fcntl.lockf(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno not in (errno.EACCES, errno.EAGAIN):
                raise
            raise IndexError_(
                f"{folder}: another `cxr index build/add` is writing this folder right now (or a gc)"
            ) from None
        try:
            yield
        finally:
            fcntl.lockf(f, fcntl.LOCK_UN)


_BUSY = object()


def _shared_lock(gen_dir: Path) -> Any:
    """A shared flock on the generation's `.readers` file: the open file, None when there is no lock file
    (a read-only copy, or the generation is gone), or _BUSY while a gc holds it exclusively."""
    import fcntl

    try:
        f = open(gen_dir / READ_LOCK, "rb")
    except OSError:
        return None
    try:
        fcntl.flock(f, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError:
        f.close()
        return _BUSY
    return f


# ----------------------------------------------------------------------------------------- resolving


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


def _gen_number(name: str) -> int | None:
    m = _GEN_RE.match(name)
    return int(m.group(1)) if m else None


def read_pointer(root: Path) -> tuple[str, str] | None:
    """(generation name, info sha256) from CURRENT, None when there is none; a damaged pointer is an error."""
    p = root / CURRENT_FILE
    try:
        raw = p.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as e:
        raise IndexError_(f"{p}: unreadable ({e.strerror or e})") from None
    m = _POINTER_RE.match(raw.decode("ascii", "replace")) if len(raw) < 200 else None
    if not m:
        raise IndexError_(f"{p}: damaged pointer (expected 'gen-NNNNNN <sha256>'); run `cxr index verify`")
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
            raise IndexError_(f"{root / CURRENT_FILE}: points to {name}, which is missing")
        return Ref(root, gen, name, sha)
    if (root / INFO_FILE).is_file():
        return Ref(root, root, "", None)
    hint = ""
    if (root / ".build").is_dir():
        hint = " (an unfinished build: rerun `cxr index build`)"
    raise IndexError_(f"{root / INFO_FILE}: missing, not an index folder{hint}")


def has_index(index_dir: str | Path) -> bool:
    """True when the folder holds a committed index (a CURRENT pointer, or a pre-generation info file)."""
    root = Path(index_dir)
    return (root / CURRENT_FILE).exists() or (root / INFO_FILE).exists()


def _load_info(ref: Ref) -> dict:
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
    return _load_info(resolve(index_dir))


# ----------------------------------------------------------------------------------------- reading files


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


def read_meta_bytes(path: Path, rec: dict | None = None) -> pd.DataFrame:
    """Read meta.parquet once: its bytes are hashed against `rec` (when given) and then parsed."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise IndexError_(f"{path}: missing") from None
    if rec is not None and hashlib.sha256(raw).hexdigest() != rec["sha256"]:
        raise IndexError_(f"{path}: damaged, sha256 mismatch with index_info.json")
    if len(raw) < 12 or raw[:4] != b"PAR1" or raw[-4:] != b"PAR1":
        raise IndexError_(f"{path}: corrupt (not a Parquet file)")
    try:
        meta = pd.read_parquet(io.BytesIO(raw))
    except Exception as e:  # pyarrow raises several types for damaged files
        raise IndexError_(f"{path}: corrupt ({str(e).splitlines()[0][:160] if str(e) else type(e).__name__})") from e
    missing = [c for c in META_COLUMNS if c not in meta.columns]
    if missing:
        raise IndexError_(f"{path}: corrupt, missing column(s) {', '.join(missing)}")
    return meta


def _open_generation(ref: Ref, model: Any, mmap: bool, full: bool | None) -> CXRIndex:
    info = _load_info(ref)
    root, gen = ref.root, ref.gen_dir
    if model is not None:
        check_model(info, model, root)
    if mmap and "IVF" not in info["factory"]:
        raise UsageError(
            f"--mmap works for IVF indexes only (they keep their inverted lists on disk); "
            f"{root} is {info['factory']!r}: drop --mmap or rebuild with an IVF factory"
        )
    files = info.get("files")
    if full is None:
        total = sum(r["size"] for r in (files or {}).values())
        full = not mmap and total <= FULL_HASH_AT_OPEN
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
        path=root, images=images, reports=reports, meta=meta, info=info, mmap=mmap, generation=ref.name, gen_dir=gen
    )


def open_index(index_dir: str | Path, model: Any = None, mmap: bool = False, full: bool | None = None) -> CXRIndex:
    """Open the current generation for search; refuse a model of another fingerprint and damaged files.

    Holds a shared read lock on the generation while opening (for an mmap index, until `close()`), so a gc
    never removes it under the reader. `full` forces (True) or skips (False) the full hash of every file;
    by default it runs for generations up to FULL_HASH_AT_OPEN bytes."""
    last: IndexError_ | None = None
    for attempt in range(100):
        ref = resolve(index_dir)
        if ref.info_sha is None:  # pre-generation folder: nothing to lock
            return _open_generation(ref, model, mmap, full)
        lock = _shared_lock(ref.gen_dir)
        if lock is _BUSY or (lock is None and not ref.info_path.is_file()):
            time.sleep(0.005 * (1 + attempt % 10))  # a gc is removing it: CURRENT has moved on already
            continue
        try:
            idx = _open_generation(ref, model, mmap, full)
        except IndexError_ as e:
            if lock is not None:
                lock.close()
            if read_pointer(ref.root) not in (None, (ref.name, ref.info_sha)):
                last = e  # a writer committed meanwhile: read the new generation
                continue
            raise
        if mmap and lock is not None:
            idx.extra["read_lock"] = lock
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


# ----------------------------------------------------------------------------------------- writing


def write_faiss(index: Any, path: Path) -> None:
    """Write a FAISS index atomically (always from a CPU index)."""
    import faiss

    with atomic_path(path) as tmp:
        faiss.write_index(index, str(tmp))


def write_meta(meta: pd.DataFrame, path: Path) -> None:
    """Write meta.parquet atomically."""
    with atomic_path(path) as tmp:
        meta.to_parquet(tmp, index=False)


def write_bad(bad: pd.DataFrame, path: Path) -> None:
    """Write bad_images.csv atomically (path, reason and where the row came from)."""
    with atomic_path(path) as tmp:
        bad.reindex(columns=BAD_COLUMNS).to_csv(tmp, index=False)


def generations(root: Path) -> list[tuple[int, Path]]:
    """The generation folders of an index, oldest first."""
    out = []
    for p in Path(root).iterdir() if Path(root).is_dir() else []:
        n = _gen_number(p.name)
        if n is not None and p.is_dir():
            out.append((n, p))
    return sorted(out)


def verify_generation(gen_dir: Path, info: dict) -> int:
    """Full check of a written generation: every file's size and sha256; returns the bytes hashed."""
    check_files(gen_dir, info, full=True)
    return sum(r["size"] for r in info["files"].values())


def commit_generation(
    out_dir: str | Path,
    images: Any,
    reports: Any,
    meta: pd.DataFrame,
    info: dict,
    bad: pd.DataFrame | None = None,
) -> Path:
    """Write a complete new generation beside the current one, verify it, then switch CURRENT to it.

    The caller holds `writer_lock(out_dir)`. Returns the new generation's folder."""
    import faiss

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    n = int(images.ntotal)
    if int(reports.ntotal) != n or len(meta) != n:
        raise IndexError_(
            f"{out}: refusing to write an inconsistent index "
            f"(images {n}, reports {reports.ntotal}, meta {len(meta)} rows)"
        )
    pointer = read_pointer(out)
    numbers = [g for g, _ in generations(out)] + ([_gen_number(pointer[0]) or 0] if pointer else [])
    number = max(numbers, default=0) + 1
    gen = out / f"{GEN_PREFIX}{number:06d}"
    gen.mkdir()
    faiss.write_index(images, str(gen / IMAGES_FILE))
    faiss.write_index(reports, str(gen / REPORTS_FILE))
    meta = meta.copy()
    meta.attrs = {}  # pandas would try to store attrs (e.g. numpy arrays) as JSON in the file
    meta.to_parquet(gen / META_FILE, index=False)
    names = [IMAGES_FILE, REPORTS_FILE, META_FILE]
    info = dict(info)
    info.update(count=n, dim=int(images.d), metric=METRIC, format_version=FORMAT_VERSION, generation=number)
    if bad is not None:
        info["bad_images"] = int(len(bad))
        if len(bad):
            bad.reindex(columns=BAD_COLUMNS).to_csv(gen / BAD_FILE, index=False)
            names.append(BAD_FILE)
    for name in names:
        fsync_file(gen / name)
    info["files"] = {name: file_record(gen / name) for name in names}
    validate_info(info, gen / INFO_FILE)
    (gen / INFO_FILE).write_text(json.dumps(info, indent=2, default=str) + "\n")
    fsync_file(gen / INFO_FILE)
    (gen / READ_LOCK).touch()
    fsync_dir(gen)
    verify_generation(gen, info)  # the full hash check after each build/add, before anyone can read it
    with atomic_path(out / CURRENT_FILE) as tmp:
        tmp.write_text(f"{gen.name} {sha256_file(gen / INFO_FILE)}\n")
    for name in (IMAGES_FILE, REPORTS_FILE, META_FILE, BAD_FILE, INFO_FILE):  # a pre-generation layout
        (out / name).unlink(missing_ok=True)
    collect_garbage(out)
    return gen


def save_index(
    out_dir: str | Path,
    images: Any,
    reports: Any,
    meta: pd.DataFrame,
    info: dict,
    bad: pd.DataFrame | None = None,
) -> Path:
    """Write an index folder as a new generation (taking the writer lock); returns the folder."""
    with writer_lock(Path(out_dir)):
        commit_generation(out_dir, images, reports, meta, info, bad)
    return Path(out_dir)


def collect_garbage(root: str | Path) -> dict:
    """Remove what no reader needs: superseded generations no reader holds, generations a killed writer left
    unfinished (newer than CURRENT), and temporary files. The caller holds `writer_lock(root)`.

    Returns {"removed": [...], "kept": [...]} (kept: superseded generations a reader holds right now)."""
    import fcntl

    root = Path(root)
    clean_temporaries(root)
    pointer = read_pointer(root)
    current = _gen_number(pointer[0]) if pointer else None
    removed, kept = [], []
    for number, gen in generations(root):
        if number == current:
            continue
        if current is not None and number < current:
            try:
                f = open(gen / READ_LOCK, "rb")
            except OSError:
                f = None
            if f is not None:
                try:
                    fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except OSError:
                    f.close()
                    kept.append(gen.name)
                    continue
            try:
                shutil.rmtree(gen, ignore_errors=True)
            finally:
                if f is not None:
                    f.close()
        else:  # newer than CURRENT (or no CURRENT at all): a commit that never happened
            shutil.rmtree(gen, ignore_errors=True)
        removed.append(gen.name)
    if removed:
        log.info("%s: removed generation(s) %s", root, ", ".join(removed))
    return {"removed": removed, "kept": kept}


def gc_index(index_dir: str | Path) -> dict:
    """`cxr index gc`: take the writer lock and collect garbage (see `collect_garbage`)."""
    root = Path(index_dir)
    resolve(root)  # an error for a folder that is not an index
    with writer_lock(root):
        return collect_garbage(root)


def verify_index(index_dir: str | Path) -> dict:
    """`cxr index verify`: the pointer, the info schema, the size and sha256 of every file, and that the FAISS
    files and meta load with the recorded counts. Raises IndexError_ naming the first damaged file."""
    t0 = time.perf_counter()
    ref = resolve(index_dir)
    if ref.info_sha is None:
        raise IndexError_(
            f"{ref.root}: written before checksummed generations, nothing to verify against; "
            "rebuild it (or run `cxr index add` once) to record checksums"
        )
    lock = _shared_lock(ref.gen_dir)
    try:
        info = _load_info(ref)
        nbytes = verify_generation(ref.gen_dir, info)
        idx = _open_generation(ref, None, False, full=False)  # already hashed: check structure and counts
    finally:
        if lock not in (None, _BUSY):
            lock.close()
    return {
        "index": str(ref.root),
        "generation": ref.name,
        "files": sorted(info["files"]),
        "rows": idx.count,
        "bytes": nbytes,
        "seconds": round(time.perf_counter() - t0, 4),
    }


def index_summary(index_dir: str | Path) -> dict:
    """A summary for `cxr index info`: the info record, counts from meta and file sizes (no FAISS load).

    The files' sizes and hashes are checked as when opening, so a damaged index is an error here too."""
    ref = resolve(index_dir)
    info = _load_info(ref)
    files = info.get("files")
    total = sum(r["size"] for r in (files or {}).values())
    check_files(ref.gen_dir, info, full=total <= FULL_HASH_AT_OPEN, skip_full=(META_FILE,))
    for name in (IMAGES_FILE, REPORTS_FILE):
        p = ref.gen_dir / name
        if not p.is_file() or p.stat().st_size == 0:
            raise IndexError_(f"{p}: missing or empty")
    meta = read_meta_bytes(ref.gen_dir / META_FILE, files.get(META_FILE) if files else None)
    if len(meta) != info["count"]:
        raise IndexError_(f"{ref.gen_dir / META_FILE}: has {len(meta)} rows, {INFO_FILE} says {info['count']}")
    labels = pd.Series([lab for labs in meta["labels"] for lab in (labs if labs is not None else [])], dtype=str)
    summary = dict(info)
    summary.pop("files", None)
    summary["path"] = str(ref.root.resolve())
    summary["generation"] = ref.name or "(none: written before generations)"
    summary["rows"] = len(meta)
    summary["studies"] = int(meta["study_id"].nunique())
    summary["patients"] = int(meta["patient_id"].nunique())
    summary["with_report"] = int(meta["has_report"].sum())
    summary["splits"] = {str(k): int(v) for k, v in meta["split"].fillna("").value_counts().items()}
    summary["labels"] = {str(k): int(v) for k, v in labels.value_counts().items()}
    summary["files"] = {k: v["size"] for k, v in files.items()} if files else _legacy_sizes(ref.gen_dir)
    summary["bad_images"] = len(read_bad(ref.root))
    return summary


def _legacy_sizes(path: Path) -> dict:
    return {
        name: (path / name).stat().st_size
        for name in (IMAGES_FILE, REPORTS_FILE, META_FILE, INFO_FILE, BAD_FILE)
        if (path / name).is_file()
    }
