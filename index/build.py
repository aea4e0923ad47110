"""Streaming, resumable index builds (`cxr index build`) and appends (`cxr index add`).

How a build survives a kill at any moment (SIGKILL included):

* The manifest's rows are cut into fixed shards of `shard_rows` consecutive rows. Each shard is encoded
  (images in DataLoader workers, reports with `encode_texts`) and written as ONE file,
  `OUT/.build/shard-NNNNNN.npz` (row ids, image vectors, report vectors, bad rows + reasons), under a
  temporary name renamed into place. A shard file that exists is complete; a partial one only ever exists
  under a temporary name and is deleted.
* `OUT/.build/plan.json` pins the manifest (a digest of its image ids and paths), the model fingerprint and
  the shard size: a rerun with the same inputs encodes only the missing shards; different inputs are refused.
* When every shard is there, the FAISS indexes are trained (on a sample) and filled shard by shard, the
  folder is written (index/store.py, index_info.json last) and `.build` is removed. Rows come out in manifest
  order, so a resumed build equals an uninterrupted one.

Memory stays flat in the number of images apart from the vectors themselves (and the manifest's metadata):
only one shard of vectors is held while encoding, and one shard at a time is read while filling FAISS.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from index import store
from index.factory import add_chunks, choose_factory, make_index, train_index, train_size
from retrieval.errors import IndexError_, ManifestError
from retrieval.fileio import atomic_path, write_json_atomic

SHARD_ROWS = 1024
BUILD_DIR = ".build"
ADD_DIR = ".add"
LOCK_FILE = ".lock"
REPORTS_NOTE = (
    "one report vector per image row (same row ids as images.faiss; a study's report repeats per image); "
    "report searches return each study once"
)


@dataclass
class BuildResult:
    """What a build or add did: the folder, rows indexed (total and by this run), skipped images, timing."""

    index_dir: Path
    count: int
    added: int
    bad: pd.DataFrame
    factory: str
    encoded_rows: int
    resumed_rows: int
    seconds: float

    def as_dict(self) -> dict:
        """JSON-friendly summary for `--json`."""
        return {
            "index": str(self.index_dir),
            "count": self.count,
            "added": self.added,
            "bad_images": int(len(self.bad)),
            "bad_list": str(self.index_dir / store.BAD_FILE) if len(self.bad) else None,
            "factory": self.factory,
            "encoded_rows": self.encoded_rows,
            "resumed_rows": self.resumed_rows,
            "seconds": round(self.seconds, 2),
        }


def report_text(row: Any) -> str:
    """The text indexed for a row: `report`, else findings + impression (empty when there is none)."""
    text = str(row.get("report") or "").strip()
    if not text:
        text = " ".join(str(row.get(c) or "").strip() for c in ("findings", "impression")).strip()
    return text


def prepare_rows(manifest: pd.DataFrame | str | Path) -> pd.DataFrame:
    """The manifest as the rows an index stores (meta columns, resolved absolute image paths, report text)."""
    from retrieval.data.manifest import normalize_manifest, read_manifest, resolve_image_path

    if isinstance(manifest, str | Path):
        df = read_manifest(manifest)
    else:
        root = manifest.attrs.get("root")
        df = normalize_manifest(manifest)
        df.attrs["root"] = root
    missing = [c for c in ("image_id", "study_id", "patient_id", "image_path") if c not in df.columns]
    if missing:
        raise ManifestError(f"{df.attrs.get('path', 'manifest')}: missing column(s) {', '.join(missing)}")
    if len(df) == 0:
        raise ManifestError(f"{df.attrs.get('root', 'manifest')}: the manifest has no rows")
    dup = df["image_id"][df["image_id"].duplicated()]
    if len(dup):
        raise ManifestError(f"image_id {dup.iloc[0]!r} appears more than once ({len(dup)} duplicates) in the manifest")
    root = df.attrs.get("root")
    rows = pd.DataFrame(
        {
            "image_id": df["image_id"].astype(str),
            "study_id": df["study_id"].astype(str),
            "patient_id": df["patient_id"].astype(str),
            "image_path": [str(resolve_image_path(root, p)) if str(p).strip() else "" for p in df["image_path"]],
            "view": df["view"].astype(str),
            "report": [report_text(r) for r in df.to_dict("records")],
            "labels": [list(x) for x in df["labels"]],
            "split": df["split"].astype(str),
            "source": df["source"].astype(str),
        }
    )
    rows["has_report"] = rows["report"].str.len() > 0
    return rows.reset_index(drop=True)


def manifest_digest(rows: pd.DataFrame) -> str:
    """A digest of the rows' ids, paths and texts: a resumed build must see the same manifest."""
    h = hashlib.sha256()
    for col in ("image_id", "image_path", "report"):
        h.update("\x1f".join(rows[col]).encode())
        h.update(b"\x1e")
    return h.hexdigest()[:16]


@contextlib.contextmanager
def exclusive(folder: Path) -> Iterator[None]:
    """Hold an exclusive lock on `folder` so that two builds/adds never write it at once. A POSIX record lock:
    it belongs to this process only (forked DataLoader workers do not inherit it) and the OS drops it when the
    process dies (SIGKILL included), so a rerun after a kill is never blocked."""
    import errno
    import fcntl

    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / LOCK_FILE, "a") as f:
        try:
            fcntl.lockf(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno not in (errno.EACCES, errno.EAGAIN):
                raise
            raise IndexError_(f"{folder}: another `cxr index build/add` is writing this folder right now") from None
        try:
            yield
        finally:
            fcntl.lockf(f, fcntl.LOCK_UN)


def _shard_path(work: Path, s: int) -> Path:
    return work / f"shard-{s:06d}.npz"


def _check_plan(work: Path, plan: dict) -> None:
    """Create plan.json, or check that the unfinished run in `work` had the same inputs."""
    path = work / "plan.json"
    if path.is_file():
        try:
            old = json.loads(path.read_text())
        except ValueError:
            old = None
        if old is not None:
            diff = [k for k in plan if old.get(k) != plan[k]]
            if diff:
                raise IndexError_(
                    f"{work}: an unfinished run with other inputs is here (different {', '.join(diff)}); "
                    f"rerun it with the same manifest and model, or delete {work} to start over"
                )
            return
    work.mkdir(parents=True, exist_ok=True)
    write_json_atomic(path, plan)


def _clean_partial(work: Path) -> None:
    """Delete temporary files a killed run left behind (completed shards are never temporary)."""
    for p in work.glob(".*.tmp"):
        p.unlink(missing_ok=True)


def encode_shards(
    work: Path,
    rows: pd.DataFrame,
    model: Any,
    batch_size: int = 64,
    workers: int = 2,
    shard_rows: int = SHARD_ROWS,
    precision: str | None = None,
    progress: bool = True,
) -> tuple[int, int]:
    """Encode every shard not yet in `work`; returns (rows encoded now, rows found already done)."""
    from index.encode import stream_image_vectors
    from retrieval.progress import make_progress

    _clean_partial(work)
    n = len(rows)
    n_shards = (n + shard_rows - 1) // shard_rows
    pending = [s for s in range(n_shards) if not _shard_path(work, s).is_file()]
    done_rows = n - sum(min(shard_rows, n - s * shard_rows) for s in pending)
    batches: list[list[int]] = []
    batch_shard: list[int] = []
    batches_left: dict[int, int] = {}
    for s in pending:
        lo, hi = s * shard_rows, min(n, (s + 1) * shard_rows)
        for b in range(lo, hi, batch_size):
            batches.append(list(range(b, min(hi, b + batch_size))))
            batch_shard.append(s)
            batches_left[s] = batches_left.get(s, 0) + 1
    if not batches:
        return 0, done_rows

    paths = rows["image_path"].tolist()
    texts = rows["report"].to_numpy()
    acc: dict[int, tuple[list, list, list]] = {}
    encoded = 0
    with make_progress(disable=not progress) as bar:
        task = bar.add_task("Encoding images", total=n, completed=done_rows, unit="images")
        stream = stream_image_vectors(paths, model, batches, workers=workers, precision=precision)
        for s, (ids, vecs, bad) in zip(batch_shard, stream, strict=True):
            ids_l, vecs_l, bad_l = acc.setdefault(s, ([], [], []))
            ids_l.append(ids)
            vecs_l.append(vecs)
            bad_l.extend(bad)
            batches_left[s] -= 1
            if batches_left[s] == 0:
                all_ids = np.concatenate(ids_l)
                img = np.concatenate(vecs_l) if len(all_ids) else np.zeros((0, model.embed_dim), np.float32)
                txt = np.asarray(model.encode_texts(list(texts[all_ids]), batch_size=batch_size), np.float32)
                with atomic_path(_shard_path(work, s)) as tmp, open(tmp, "wb") as f:
                    np.savez(
                        f,
                        ids=all_ids,
                        images=img.astype(np.float32),
                        reports=txt.astype(np.float32),
                        bad_ids=np.asarray([i for i, _ in bad_l], dtype=np.int64),
                        bad_reasons=np.asarray([r for _, r in bad_l], dtype=str),
                    )
                del acc[s]
            encoded += len(ids) + len(bad)
            bar.advance(task, len(ids) + len(bad))
    return encoded, done_rows


def _iter_shards(work: Path, key: str) -> Iterator[np.ndarray]:
    for p in sorted(work.glob("shard-*.npz")):
        with np.load(p) as z:
            yield z[key]


def _collect(work: Path, rows: pd.DataFrame) -> tuple[np.ndarray, pd.DataFrame, int]:
    """The good row ids (manifest order) and the bad rows of a finished shard set, and the vector dim."""
    ids, bad_ids, reasons, dim = [], [], [], 0
    for p in sorted(work.glob("shard-*.npz")):
        with np.load(p) as z:
            ids.append(z["ids"])
            bad_ids.extend(z["bad_ids"].tolist())
            reasons.extend(z["bad_reasons"].tolist())
            dim = dim or int(z["images"].shape[1])
    good = np.concatenate(ids) if ids else np.zeros(0, np.int64)
    bad_ids = np.asarray(bad_ids, dtype=np.int64)
    bad = pd.DataFrame(
        {
            "row": bad_ids,
            "image_id": rows["image_id"].to_numpy()[bad_ids] if len(bad_ids) else [],
            "path": rows["image_path"].to_numpy()[bad_ids] if len(bad_ids) else [],
            "reason": reasons,
        },
        columns=store.BAD_COLUMNS,
    )
    return good, bad.sort_values("row").reset_index(drop=True), dim


def _sample(work: Path, key: str, n_total: int, n_sample: int) -> np.ndarray:
    """A seeded random sample of `n_sample` vectors across all shards, read one shard at a time."""
    if n_sample >= n_total:
        return np.concatenate(list(_iter_shards(work, key)))
    pick = np.sort(np.random.default_rng(0).choice(n_total, n_sample, replace=False))
    out, offset = [], 0
    for chunk in _iter_shards(work, key):
        sel = pick[(pick >= offset) & (pick < offset + len(chunk))] - offset
        out.append(chunk[sel])
        offset += len(chunk)
    return np.concatenate(out)


def _fill(work: Path, key: str, factory: str, dim: int, n: int) -> Any:
    index = make_index(factory, dim)
    if not index.is_trained:
        train_index(index, _sample(work, key, n, train_size(index, n)), factory)
    add_chunks(index, _iter_shards(work, key))
    return index


def _meta(rows: pd.DataFrame, good: np.ndarray, start: int = 0) -> pd.DataFrame:
    meta = rows.iloc[good].reset_index(drop=True)
    meta.insert(0, "row_id", np.arange(start, start + len(meta), dtype=np.int64))
    return meta[store.META_COLUMNS]


def _manifest_record(manifest: Any, rows: pd.DataFrame, indexed: int, bad: int, digest: str) -> dict:
    src = str(Path(manifest).resolve()) if isinstance(manifest, str | Path) else "<DataFrame>"
    return {
        "manifest": src,
        "rows": len(rows),
        "indexed": indexed,
        "bad_images": bad,
        "digest": digest,
        "at": store.now_iso(),
    }


def build_index(
    manifest: pd.DataFrame | str | Path,
    model: Any,
    out_dir: str | Path,
    factory: str | None = None,
    batch_size: int = 64,
    workers: int = 2,
    shard_rows: int = SHARD_ROWS,
    model_path: str | Path | None = None,
    precision: str | None = None,
    progress: bool = True,
) -> BuildResult:
    """Build (or resume building) an index folder at `out_dir` from a manifest with `model`."""
    with exclusive(Path(out_dir)):
        return _build(
            manifest, model, Path(out_dir), factory, batch_size, workers, shard_rows, model_path, precision, progress
        )


def _build(manifest, model, out: Path, factory, batch_size, workers, shard_rows, model_path, precision, progress):
    t0 = time.perf_counter()
    if (out / store.INFO_FILE).exists():
        raise IndexError_(f"{out}: already holds an index; extend it with `cxr index add` or choose another --out")
    if factory is not None:
        make_index(factory, int(model.embed_dim))  # a bad --factory fails now, not after encoding
    rows = prepare_rows(manifest)
    digest = manifest_digest(rows)
    work = out / BUILD_DIR
    _check_plan(
        work,
        {
            "kind": "build",
            "manifest_digest": digest,
            "rows": len(rows),
            "model_fingerprint": str(model.fingerprint),
            "shard_rows": shard_rows,
        },
    )
    encoded, resumed = encode_shards(work, rows, model, batch_size, workers, shard_rows, precision, progress)

    good, bad, dim = _collect(work, rows)
    if len(good) == 0:
        store.write_bad(bad, out / store.BAD_FILE)
        raise IndexError_(f"{out}: none of the {len(rows)} images could be read; see {out / store.BAD_FILE}")
    factory = factory or choose_factory(len(good), dim)
    images = _fill(work, "images", factory, dim, len(good))
    reports = _fill(work, "reports", factory, dim, len(good))
    info = {
        "factory": factory,
        "normalized": True,
        "model": store.model_record(model, model_path),
        "reports": REPORTS_NOTE,
        "versions": store.versions(),
        "created": store.now_iso(),
        "manifests": [_manifest_record(manifest, rows, len(good), len(bad), digest)],
    }
    store.save_index(out, images, reports, _meta(rows, good), info, bad)
    shutil.rmtree(work, ignore_errors=True)
    return BuildResult(out, len(good), len(good), bad, factory, encoded, resumed, time.perf_counter() - t0)


def _extend(path: Path, index: Any, work: Path, key: str, base: int, target: int) -> tuple[Any, bool]:
    """Append this add's vectors unless the file already holds them (a resumed, half-written add)."""
    if index.ntotal == target:
        return index, False
    if index.ntotal != base:
        raise IndexError_(f"{path}: has {index.ntotal} rows, expected {base} or {target}; the index is damaged")
    add_chunks(index, _iter_shards(work, key))
    return index, True


def add_to_index(
    index_dir: str | Path,
    manifest: pd.DataFrame | str | Path,
    model: Any,
    batch_size: int = 64,
    workers: int = 2,
    shard_rows: int = SHARD_ROWS,
    precision: str | None = None,
    progress: bool = True,
) -> BuildResult:
    """Append a manifest's images to an existing index (same model fingerprint, new image_ids); resumable."""
    store.read_info(index_dir)  # a missing index is an error before anything is written
    with exclusive(Path(index_dir)):
        return _add(Path(index_dir), manifest, model, batch_size, workers, shard_rows, precision, progress)


def _add(out: Path, manifest, model, batch_size, workers, shard_rows, precision, progress) -> BuildResult:
    t0 = time.perf_counter()
    info = store.read_info(out)
    store.check_model(info, model, out)
    rows = prepare_rows(manifest)
    digest = manifest_digest(rows)
    work = out / ADD_DIR
    plan_path = work / "plan.json"
    base = int(json.loads(plan_path.read_text())["base_count"]) if plan_path.is_file() else int(info["count"])
    meta = pd.read_parquet(out / store.META_FILE)
    existing = set(meta["image_id"].iloc[:base])
    dup = [i for i in rows["image_id"] if i in existing]
    if dup:
        raise IndexError_(
            f"{out}: {len(dup)} image_id(s) of the manifest are already in the index (e.g. {dup[0]!r}); "
            "remove them from the manifest"
        )
    _check_plan(
        work,
        {
            "kind": "add",
            "manifest_digest": digest,
            "rows": len(rows),
            "model_fingerprint": str(model.fingerprint),
            "shard_rows": shard_rows,
            "base_count": base,
        },
    )
    encoded, resumed = encode_shards(work, rows, model, batch_size, workers, shard_rows, precision, progress)
    good, bad, _ = _collect(work, rows)
    target = base + len(good)

    images, _ = _extend(
        out / store.IMAGES_FILE, store.read_faiss(out / store.IMAGES_FILE), work, "images", base, target
    )
    reports, _ = _extend(
        out / store.REPORTS_FILE, store.read_faiss(out / store.REPORTS_FILE), work, "reports", base, target
    )
    if len(meta) == base:
        meta = pd.concat([meta, _meta(rows, good, start=base)], ignore_index=True)
    elif len(meta) != target:
        raise IndexError_(f"{out / store.META_FILE}: has {len(meta)} rows, expected {base} or {target}")
    old_bad = store.read_bad(out)
    new_bad = bad.astype(str)
    all_bad = pd.concat([old_bad, new_bad], ignore_index=True).drop_duplicates(subset=["image_id", "path"])
    info = dict(info)
    info["updated"] = store.now_iso()
    records = [m for m in info.get("manifests", []) if m.get("digest") != digest]
    info["manifests"] = records + [_manifest_record(manifest, rows, len(good), len(bad), digest)]
    store.save_index(out, images, reports, meta, info, all_bad)
    shutil.rmtree(work, ignore_errors=True)
    return BuildResult(out, target, len(good), bad, info["factory"], encoded, resumed, time.perf_counter() - t0)
