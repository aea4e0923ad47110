"""Inspecting an index folder: `verify_index` (`cxr index verify`, every file hashed) and `index_summary`
(`cxr index info`)."""

from __future__ import annotations

import time
from pathlib import Path

import pandas as pd

from index import store
from index.generations import verify_generation
from index.layout import BAD_FILE, IMAGES_FILE, INFO_FILE, META_FILE, REPORTS_FILE, check_files, read_meta_bytes
from index.store import BUSY, load_info, open_generation, read_bad, resolve, shared_lock
from retrieval.errors import IndexError_


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
    lock = shared_lock(ref.gen_dir)
    try:
        info = load_info(ref)
        nbytes = verify_generation(ref.gen_dir, info)
        idx = open_generation(ref, None, False, full=False)  # already hashed: check structure and counts
    finally:
        if lock not in (None, BUSY):
            lock.close()
    return {
        "index": str(ref.root),
        "generation": ref.name,
        "files": sorted(info["files"]),
        "rows": idx.count,
        "bytes": nbytes,
        "seconds": round(time.perf_counter() - t0, 4),
        "model_caches": model_cache_problems(info),
    }


def model_cache_problems(info: dict) -> list[str]:
    """The feature caches of the model folder the index records that fail their checksums: the index is fine, but
    the next build or add with that model runs the towers instead of reading them (a warning, not a failure)."""
    from retrieval.models.model_status import cache_problems

    path = store.recorded_model_path(info)
    return cache_problems(Path(path)) if path else []


def index_summary(index_dir: str | Path) -> dict:
    """A summary for `cxr index info`: the info record, counts from meta and file sizes (no FAISS load).

    The files' sizes and hashes are checked as when opening, so a damaged index is an error here too."""
    ref = resolve(index_dir)
    info = load_info(ref)
    files = info.get("files")
    total = sum(r["size"] for r in (files or {}).values())
    check_files(ref.gen_dir, info, full=total <= store.FULL_HASH_AT_OPEN, skip_full=(META_FILE,))
    for name in (IMAGES_FILE, REPORTS_FILE):
        p = ref.gen_dir / name
        if not p.is_file() or p.stat().st_size == 0:
            raise IndexError_(f"{p}: missing or empty")
    check_structure(ref.gen_dir, info)
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


def check_structure(gen_dir: Path, info: dict) -> None:
    """What `info` reports about the FAISS files holds for the files themselves: dimension, row count and the
    index type its factory string makes (read memory-mapped where faiss can, so large indexes stay cheap)."""
    import faiss

    from index.factory import make_index

    try:
        expected = type(faiss.downcast_index(make_index(info["factory"], int(info["dim"]))))
    except Exception as e:  # faiss refuses a nonsense factory in several ways
        raise IndexError_(f"{gen_dir / INFO_FILE}: corrupt, factory {info['factory']!r} is not valid ({e})") from None
    for name in (IMAGES_FILE, REPORTS_FILE):
        idx = store.read_faiss(gen_dir / name, mmap=True)
        if idx.d != info["dim"]:
            raise IndexError_(f"{gen_dir / name}: vector dimension {idx.d}, {INFO_FILE} says {info['dim']}")
        if idx.ntotal != info["count"]:
            raise IndexError_(f"{gen_dir / name}: {idx.ntotal} rows, {INFO_FILE} says {info['count']}")
        got = type(faiss.downcast_index(idx))
        if not (issubclass(got, expected) or issubclass(expected, got)):  # IndexFlatIP is written for Flat
            raise IndexError_(
                f"{gen_dir / name}: a {got.__name__}, but {INFO_FILE} says factory {info['factory']!r} "
                f"({expected.__name__})"
            )


def _legacy_sizes(path: Path) -> dict:
    return {
        name: (path / name).stat().st_size
        for name in (IMAGES_FILE, REPORTS_FILE, META_FILE, INFO_FILE, BAD_FILE)
        if (path / name).is_file()
    }
