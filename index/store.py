"""The index folder: file names, atomic save, load with consistency and model-fingerprint checks, and info.

An index is a folder that describes itself (clip-retrieval / autofaiss style):

    images.faiss      one image vector per manifest row that could be read (row id = position)
    reports.faiss     one report vector per image row, same row ids (a study's report is repeated per image)
    meta.parquet      row id -> image_id, study_id, patient_id, image_path, view, report, labels, split, ...
    index_info.json   factory, metric, dim, count, model name + fingerprint, versions, created/updated
    bad_images.csv    images skipped while building (path, reason), when there were any

Every file is written under a temporary name and renamed into place; `index_info.json` goes last, so an index
whose files disagree on the row count (a crash between renames) is detected when opened.
"""

from __future__ import annotations

import datetime as _dt
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from retrieval.errors import IndexError_, UsageError
from retrieval.fileio import atomic_path, write_json_atomic

IMAGES_FILE = "images.faiss"
REPORTS_FILE = "reports.faiss"
META_FILE = "meta.parquet"
INFO_FILE = "index_info.json"
BAD_FILE = "bad_images.csv"
FORMAT_VERSION = 1
METRIC = "inner_product"
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


@dataclass
class CXRIndex:
    """An opened index folder: the two FAISS indexes (CPU), the row metadata and the info record."""

    path: Path
    images: Any  # faiss.Index
    reports: Any  # faiss.Index
    meta: pd.DataFrame
    info: dict
    mmap: bool = False
    extra: dict = field(default_factory=dict)

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


def save_index(
    out_dir: str | Path,
    images: Any,
    reports: Any,
    meta: pd.DataFrame,
    info: dict,
    bad: pd.DataFrame | None = None,
) -> Path:
    """Write an index folder: FAISS files, meta and bad list first, index_info.json last (the commit)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    n = int(images.ntotal)
    if int(reports.ntotal) != n or len(meta) != n:
        raise IndexError_(
            f"{out}: refusing to write an inconsistent index "
            f"(images {n}, reports {reports.ntotal}, meta {len(meta)} rows)"
        )
    info = dict(info)
    info.update(count=n, dim=int(images.d), metric=METRIC, format_version=FORMAT_VERSION)
    write_faiss(images, out / IMAGES_FILE)
    write_faiss(reports, out / REPORTS_FILE)
    write_meta(meta, out / META_FILE)
    if bad is not None:
        info["bad_images"] = int(len(bad))
        if len(bad):
            write_bad(bad, out / BAD_FILE)
        elif (out / BAD_FILE).exists():
            (out / BAD_FILE).unlink()
    write_json_atomic(out / INFO_FILE, info)
    return out


def read_info(index_dir: str | Path) -> dict:
    """Read and check index_info.json; a missing folder or unreadable info is an IndexError_."""
    path = Path(index_dir)
    if not path.is_dir():
        raise IndexError_(f"{path}: no index folder here")
    info_path = path / INFO_FILE
    if not info_path.is_file():
        hint = " (an unfinished build: rerun `cxr index build`)" if (path / ".build").is_dir() else ""
        raise IndexError_(f"{info_path}: missing, not an index folder{hint}")
    try:
        info = json.loads(info_path.read_text())
    except (OSError, ValueError) as e:
        raise IndexError_(f"{info_path}: unreadable ({e})") from e
    for key in ("count", "dim", "model", "factory"):
        if key not in info:
            raise IndexError_(f"{info_path}: corrupt, missing {key!r}")
    return info


def _is_ivf(index: Any) -> bool:
    import faiss

    try:
        faiss.extract_index_ivf(index)
        return True
    except RuntimeError:
        return False


def read_faiss(path: Path, mmap: bool = False) -> Any:
    """Read one FAISS file; `mmap` memory-maps the inverted lists (IVF indexes only)."""
    import faiss

    if not path.is_file():
        raise IndexError_(f"{path}: missing")
    try:
        index = faiss.read_index(str(path), faiss.IO_FLAG_MMAP if mmap else 0)
    except RuntimeError as e:
        raise IndexError_(f"{path}: corrupt FAISS file ({str(e).splitlines()[0][:160]})") from e
    return index


def open_index(index_dir: str | Path, model: Any = None, mmap: bool = False) -> CXRIndex:
    """Open an index folder for search; refuse a model of another fingerprint and inconsistent files."""
    path = Path(index_dir)
    info = read_info(path)
    if model is not None:
        check_model(info, model, path)
    if mmap and "IVF" not in info["factory"]:
        raise UsageError(
            f"--mmap works for IVF indexes only (they keep their inverted lists on disk); "
            f"{path} is {info['factory']!r}: drop --mmap or rebuild with an IVF factory"
        )
    images = read_faiss(path / IMAGES_FILE, mmap)
    reports = read_faiss(path / REPORTS_FILE, mmap)
    if mmap and not _is_ivf(images):
        raise UsageError(f"--mmap works for IVF indexes only; {path / IMAGES_FILE} is not IVF")
    try:
        meta = pd.read_parquet(path / META_FILE)
    except FileNotFoundError as e:
        raise IndexError_(f"{path / META_FILE}: missing") from e
    except Exception as e:  # pyarrow raises several types for damaged files
        raise IndexError_(f"{path / META_FILE}: corrupt ({e})") from e
    n = int(info["count"])
    counts = {IMAGES_FILE: int(images.ntotal), REPORTS_FILE: int(reports.ntotal), META_FILE: len(meta)}
    wrong = {k: v for k, v in counts.items() if v != n}
    if wrong:
        raise IndexError_(
            f"{path}: inconsistent index, {INFO_FILE} says {n} rows but "
            + ", ".join(f"{k} has {v}" for k, v in wrong.items())
            + " (an interrupted write: rerun the build/add that was interrupted)"
        )
    if images.d != info["dim"] or reports.d != info["dim"]:
        raise IndexError_(f"{path}: vector dimension differs from {INFO_FILE} ({images.d} vs {info['dim']})")
    return CXRIndex(path=path, images=images, reports=reports, meta=meta, info=info, mmap=mmap)


def read_bad(index_dir: str | Path) -> pd.DataFrame:
    """The skipped images of an index (empty when there were none)."""
    p = Path(index_dir) / BAD_FILE
    if not p.is_file():
        return pd.DataFrame(columns=BAD_COLUMNS)
    return pd.read_csv(p, dtype=str, keep_default_na=False)


def _file_sizes(path: Path) -> dict:
    return {
        name: (path / name).stat().st_size
        for name in (IMAGES_FILE, REPORTS_FILE, META_FILE, INFO_FILE, BAD_FILE)
        if (path / name).is_file()
    }


def index_summary(index_dir: str | Path) -> dict:
    """A summary for `cxr index info`: the info record, counts from meta and file sizes (no FAISS load)."""
    path = Path(index_dir)
    info = read_info(path)
    try:
        meta = pd.read_parquet(path / META_FILE, columns=["study_id", "patient_id", "labels", "split", "has_report"])
    except Exception as e:
        raise IndexError_(f"{path / META_FILE}: missing or corrupt ({e})") from e
    labels = pd.Series([lab for labs in meta["labels"] for lab in (labs if labs is not None else [])], dtype=str)
    summary = dict(info)
    summary["path"] = str(path.resolve())
    summary["rows"] = len(meta)
    summary["studies"] = int(meta["study_id"].nunique())
    summary["patients"] = int(meta["patient_id"].nunique())
    summary["with_report"] = int(meta["has_report"].sum())
    summary["splits"] = {str(k): int(v) for k, v in meta["split"].fillna("").value_counts().items()}
    summary["labels"] = {str(k): int(v) for k, v in labels.value_counts().items()}
    summary["files"] = _file_sizes(path)
    summary["bad_images"] = len(read_bad(path))
    return summary
