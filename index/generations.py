"""Writing an index folder: the writer lock, committing a new generation (written, fsynced, hashed, verified,
then `CURRENT` switched), and collecting the generations no reader holds (`cxr index gc`)."""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pandas as pd

from index.layout import (
    BAD_COLUMNS,
    BAD_FILE,
    CURRENT_FILE,
    FORMAT_VERSION,
    GEN_PREFIX,
    IMAGES_FILE,
    INFO_FILE,
    LOCK_FILE,
    META_FILE,
    METRIC,
    READ_LOCK,
    REPORTS_FILE,
    check_files,
    file_record,
    gen_number,
    generation_dirs,
    intact_info_sha,
    lost_pointer,
    newest_intact,
    unrecorded_files,
    validate_info,
)
from index.store import read_pointer, resolve
from retrieval.errors import IndexError_
from retrieval.fileio import atomic_path, clean_temporaries, fsync_dir, fsync_file, sha256_file

log = logging.getLogger(__name__)


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


generations = generation_dirs


def verify_generation(gen_dir: Path, info: dict) -> int:
    """Full check of a written generation: every file's size and sha256, and no file it does not record; returns
    the bytes hashed."""
    extra = unrecorded_files(gen_dir, info)
    if extra:
        raise IndexError_(f"{gen_dir / extra[0]}: not recorded in {INFO_FILE} (remove it, or rebuild the index)")
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
    numbers = [g for g, _ in generations(out)] + ([gen_number(pointer[0]) or 0] if pointer else [])
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


def save_index(out_dir: str | Path, *args: Any, **kwargs: Any) -> Path:
    """Write an index folder as a new generation (taking the writer lock); returns the folder. The other arguments
    are `commit_generation`'s (images, reports, meta, info, bad)."""
    with writer_lock(Path(out_dir)):
        commit_generation(out_dir, *args, **kwargs)
    return Path(out_dir)


def collect_garbage(root: str | Path) -> dict:
    """Remove what no reader needs: superseded generations no reader holds, generations a killed writer left
    unfinished (newer than CURRENT), and temporary files. The caller holds `writer_lock(root)`.

    Returns {"removed": [...], "kept": [...]} (kept: superseded generations a reader holds right now)."""
    import fcntl

    root = Path(root)
    clean_temporaries(root)
    pointer = read_pointer(root)
    if pointer is None and newest_intact(root) is not None:  # CURRENT lost: never delete what it pointed to
        raise lost_pointer(root, "missing")
    if pointer is not None and not (root / pointer[0]).is_dir():
        raise lost_pointer(root, f"points to {pointer[0]}, which is missing")
    current = gen_number(pointer[0]) if pointer else None
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


def adopt_first_commit(root: Path, digest: str, fingerprint: str) -> bool:
    """A first build killed after its generation was verified but before `CURRENT` was written left a whole
    generation and no pointer. When the newest intact generation holds exactly this build (its one manifest has
    `digest`, its model `fingerprint`), point `CURRENT` at it and return True; anything else is left to the
    lost-pointer rule (refused, naming `cxr index repair`). The caller holds `writer_lock(root)`."""
    if (root / CURRENT_FILE).exists() or (root / INFO_FILE).exists():
        return False
    found = newest_intact(root)
    if found is None:
        return False
    info = json.loads((root / found[0] / INFO_FILE).read_text())
    manifests = info.get("manifests") or []
    if len(manifests) != 1 or manifests[0].get("digest") != digest or info["model"]["fingerprint"] != fingerprint:
        return False
    with atomic_path(root / CURRENT_FILE) as tmp:
        tmp.write_text(f"{found[0]} {found[1]}\n")
    log.info("%s: %s was committed but not pointed to (a kill at the last step): CURRENT now names it", root, found[0])
    return True


def repair_index(index_dir: str | Path) -> dict:
    """`cxr index repair`: point CURRENT at the newest generation that verifies in full, when CURRENT is missing,
    damaged or points to a generation that does not verify. Returns {"index", "generation", "repaired"}."""
    root = Path(index_dir)
    if not root.is_dir():
        raise IndexError_(f"{root}: no index folder here")
    with writer_lock(root):
        try:
            pointer = read_pointer(root)
        except IndexError_:
            pointer = None
        if pointer is not None and intact_info_sha(root / pointer[0]) == pointer[1]:
            return {"index": str(root), "generation": pointer[0], "repaired": False}
        found = newest_intact(root)
        if found is None:
            raise IndexError_(f"{root}: no intact generation is left to restore; rebuild the index")
        name, sha = found
        with atomic_path(root / CURRENT_FILE) as tmp:
            tmp.write_text(f"{name} {sha}\n")
        log.warning("%s: CURRENT restored to %s", root, name)
        return {"index": str(root), "generation": name, "repaired": True}
