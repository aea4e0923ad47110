"""The on-disk format of an index folder: the file names, the typed schema of index_info.json, and the size and
hash records every file is checked against (the layout is drawn in index/store.py's docstring)."""

from __future__ import annotations

import datetime as _dt
import hashlib
import io
import re
import threading
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from retrieval.data.manifest import DICOM_COLUMNS
from retrieval.errors import IndexError_
from retrieval.fileio import sha256_file

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


# Optional meta columns (retrieval.data.manifest.DICOM_COLUMNS): a generation written before they existed, or from
# a manifest without them, reads them as '' (`layout.read_meta_bytes`).
OPTIONAL_META_COLUMNS = list(DICOM_COLUMNS)


BAD_COLUMNS = ["row", "image_id", "path", "reason"]


GEN_RE = re.compile(r"^gen-(\d{6,})$")


POINTER_RE = re.compile(r"\A(gen-\d{6,}) ([0-9a-f]{64})\n\Z")  # exactly as written: any change is damage


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


class AbstainRecord(BaseModel):
    """The no-close-match threshold of one query modality (index/abstain.py); older indexes have none."""

    model_config = ConfigDict(extra="allow", strict=True)
    threshold: float
    quantile: float = Field(gt=0, lt=1)
    neighbours: int = Field(default=1, ge=1)
    queries: int = Field(ge=0)


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
    abstain: dict[Literal["image", "text"], AbstainRecord] | None = None


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


def gen_number(name: str) -> int | None:
    m = GEN_RE.match(name)
    return int(m.group(1)) if m else None


def generation_dirs(root: Path) -> list[tuple[int, Path]]:
    """The generation folders of an index, oldest first."""
    out = []
    for p in Path(root).iterdir() if Path(root).is_dir() else []:
        n = gen_number(p.name)
        if n is not None and p.is_dir():
            out.append((n, p))
    return sorted(out)


def unrecorded_files(gen_dir: Path, info: dict) -> list[str]:
    """Names in a generation folder that its info record does not list (nothing may be dropped in unnoticed)."""
    known = set(info.get("files") or {}) | {INFO_FILE, READ_LOCK}
    return sorted(p.name for p in gen_dir.iterdir() if p.name not in known)


def intact_info_sha(gen_dir: Path) -> str | None:
    """The sha256 of a generation's index_info.json when the whole generation verifies (schema, every file's size
    and sha256, nothing unrecorded), else None."""
    import json

    try:
        raw = (gen_dir / INFO_FILE).read_bytes()
        info = validate_info(json.loads(raw), gen_dir / INFO_FILE)
        if info.get("files") is None or unrecorded_files(gen_dir, info):
            return None
        check_files(gen_dir, info, full=True)
    except (OSError, ValueError, IndexError_):
        return None
    return hashlib.sha256(raw).hexdigest()


def newest_intact(root: Path) -> tuple[str, str] | None:
    """(name, info sha256) of the newest generation of `root` that verifies in full, None when none does."""
    for _, gen in reversed(generation_dirs(root)):
        sha = intact_info_sha(gen)
        if sha is not None:
            return gen.name, sha
    return None


def lost_pointer(root: Path, why: str) -> IndexError_:
    """The one-line error for a folder whose CURRENT cannot be read: it names the generation to restore."""
    where = Path(root) / CURRENT_FILE
    found = newest_intact(root)
    if found is None:
        return IndexError_(f"{where}: {why}, and no intact generation is left; rebuild the index")
    return IndexError_(
        f"{where}: {why}; the newest intact generation is {found[0]}: run `cxr index repair {root}` to restore it "
        "(nothing was changed)"
    )


class BackgroundHash:
    """The full sha256 of the files an open skipped (a generation above `FULL_HASH_AT_OPEN`, or `--mmap`), in a
    daemon thread started at open. Nothing is answered before it ends: `wait()` blocks until then and raises the
    mismatch, naming the file, from then on (a reader stops serving a generation whose bytes changed)."""

    def __init__(self, gen_dir: Path, info: dict, names: tuple[str, ...]):
        self.error: str | None = None
        self._done = threading.Event()
        self._guard = threading.Lock()
        self._held: Any = None  # the generation's read lock, kept until the hash ends (a gc waits for it)
        jobs = [(gen_dir / n, info["files"][n]["sha256"]) for n in names if n in (info.get("files") or {})]
        threading.Thread(target=self._run, args=(jobs,), name="cxr-index-verify", daemon=True).start()

    def _run(self, jobs: list[tuple[Path, str]]) -> None:
        try:
            for path, want in jobs:
                if sha256_file(path) != want:
                    self.error = f"{path}: damaged, sha256 mismatch with index_info.json (found after a quick open)"
                    return
        except OSError as e:
            self.error = f"{jobs[0][0].parent}: unreadable while verifying ({e.strerror or e})"
        finally:
            with self._guard:
                self._done.set()
                held, self._held = self._held, None
            if held is not None:
                held.close()

    def hold(self, lock: Any) -> None:
        """Keep the generation's shared read lock (an open file) until the hash ends, then close it."""
        with self._guard:
            if not self._done.is_set():
                self._held = lock
                return
        lock.close()

    @property
    def done(self) -> bool:
        return self._done.is_set()

    def wait(self) -> None:
        """Block until every file is hashed; an IndexError_ naming the file when one does not match."""
        self._done.wait()
        if self.error:
            raise IndexError_(self.error)


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
    for col in OPTIONAL_META_COLUMNS:  # generations written before the DICOM columns existed read them as ''
        if col not in meta.columns:
            meta[col] = ""
    return meta
