"""Streaming, resumable index builds (`cxr index build`) and appends (`cxr index add`).

How a build survives a kill at any moment (SIGKILL included):

* The manifest first goes through the shared validator (`retrieval.data.manifest.check_manifest`): rows with
  empty ids, unparseable labels, unknown splits or paths outside the manifest folder (without
  `allow_outside`) fail the command before any work, or are skipped into bad_images.csv (`skip_bad_rows`).
* The rows are cut into fixed shards of `shard_rows` consecutive rows. Each shard is encoded (images in
  DataLoader workers, reports with `encode_texts`) and written as ONE file, `OUT/.build/shard-NNNNNN.npz`
  (row ids, image vectors, report vectors, bad rows + reasons, and a sha256 of them all), under a temporary
  name renamed into place. A shard that fails its checksum or does not cover its rows is refused by name.
* `OUT/.build/plan.json` pins the manifest (a digest of its rows), the model fingerprint and the shard size,
  and carries its own sha256: a rerun with the same inputs encodes only the missing shards; other inputs, or a
  damaged plan, are refused with one line.
* When every shard is there, the FAISS indexes are trained (on a sample) and filled shard by shard (with
  `--engine ray`: one part per shard filled by a Ray task, the parts merged in shard order; index/shards.py), and the
  result is committed as a new generation (index/store.py: files fsynced and hashed, then CURRENT switched).
  Rows come out in manifest order, so a resumed build equals an uninterrupted one.
* A rerun after the commit (a kill between the commit and the clean-up, or simply the same command twice)
  finds its manifest recorded in the current generation, removes the leftovers and exits 0 saying so.

Memory stays flat in the number of images apart from the vectors themselves (and the manifest's metadata):
only one shard of vectors is held while encoding, and one shard at a time is read while filling FAISS.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from index import shards, store, tune
from index.factory import add_chunks, choose_factory, make_index, train_index, train_size
from retrieval.errors import IndexError_, ManifestError, UsageError
from retrieval.fileio import atomic_path, clean_temporaries, write_json_atomic

log = logging.getLogger(__name__)
SHARD_ROWS = 1024
BUILD_DIR = ".build"
ADD_DIR = ".add"
LOCK_FILE = store.LOCK_FILE
PLAN_FILE = "plan.json"
SHARD_KEYS = ("ids", "images", "reports", "bad_ids", "bad_reasons")
REPORTS_NOTE = (
    "one report vector per image row (same row ids as images.faiss; a study's report repeats per image); "
    "report searches return each study once"
)
exclusive = store.writer_lock  # the writer lock (kept under its old name)


@dataclass
class BuildOptions:
    """How a build or add runs (everything but the manifest, the model and the folder)."""

    factory: str | None = None
    batch_size: int = 64
    workers: int = 2
    shard_rows: int = SHARD_ROWS
    model_path: str | Path | None = None
    precision: str | None = None
    progress: bool = True
    allow_outside: bool = False
    skip_bad_rows: bool = False
    target_recall: float = tune.DEFAULT_TARGET
    max_memory: int | None = None  # bytes the index may take in RAM (the default factory rule honours it)
    engine: str = "local"  # "local" (DataLoader workers) or "ray" (index/ray_build.py)
    ray_address: str | None = None
    ray_actors: int | None = None
    ray_gpus: float = 0
    model_loader: Any = None  # ray: a picklable callable returning the model in each actor


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
    already_done: bool = False
    generation: str = ""
    refused: pd.DataFrame = field(default_factory=lambda: pd.DataFrame(columns=store.BAD_COLUMNS))
    search: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        """JSON-friendly summary for `--json`."""
        return {
            "index": str(self.index_dir),
            "count": self.count,
            "added": self.added,
            "bad_images": int(len(self.bad)),
            "bad_list": str(self.index_dir / self.generation / store.BAD_FILE) if len(self.bad) else None,
            "refused_rows": int(len(self.refused)),
            "factory": self.factory,
            "encoded_rows": self.encoded_rows,
            "resumed_rows": self.resumed_rows,
            "seconds": round(self.seconds, 2),
            "already_done": self.already_done,
            "generation": self.generation,
            "search": self.search,
        }


def report_text(row: Any) -> str:
    """The text indexed for a row: `report`, else findings + impression (empty when there is none)."""
    text = str(row.get("report") or "").strip()
    if not text:
        text = " ".join(str(row.get(c) or "").strip() for c in ("findings", "impression")).strip()
    return text


def prepare(
    manifest: pd.DataFrame | str | Path, allow_outside: bool = False, skip_bad_rows: bool = False
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The manifest as the rows an index stores (meta columns, normalised absolute image paths, report text),
    after the shared validator; and the refused rows (row, image_id, path, reason), with `skip_bad_rows`.

    rows.attrs["positions"] holds each kept row's position in the manifest."""
    from retrieval.data.manifest import check_manifest, normalize_manifest, read_manifest, resolve_image_path

    if isinstance(manifest, str | Path):
        df = read_manifest(manifest)
    else:
        attrs = dict(manifest.attrs)
        df = normalize_manifest(manifest)
        df.attrs.update({k: v for k, v in attrs.items() if k in ("root", "path")})
    missing = [c for c in ("image_id", "study_id", "patient_id", "image_path") if c not in df.columns]
    if missing:
        raise ManifestError(f"{df.attrs.get('path', 'manifest')}: missing column(s) {', '.join(missing)}")
    if len(df) == 0:
        raise ManifestError(f"{df.attrs.get('path') or df.attrs.get('root') or 'manifest'}: the manifest has no rows")
    checked = check_manifest(df, allow_outside=allow_outside, skip_bad_rows=skip_bad_rows)
    df = checked.rows
    if len(df) == 0:
        raise ManifestError(f"{df.attrs.get('path', 'manifest')}: every row was refused; see the reasons above")
    root = df.attrs.get("root")
    rows = pd.DataFrame(
        {
            "image_id": df["image_id"].astype(str),
            "study_id": df["study_id"].astype(str),
            "patient_id": df["patient_id"].astype(str),
            "image_path": [
                str(resolve_image_path(root, p, allow_outside=allow_outside)) if str(p).strip() else ""
                for p in df["image_path"]
            ],
            "view": df["view"].astype(str),
            "report": [report_text(r) for r in df.to_dict("records")],
            "labels": [list(x) for x in df["labels"]],
            "split": df["split"].astype(str),
            "source": df["source"].astype(str),
        }
    )
    rows["has_report"] = rows["report"].str.len() > 0
    rows = rows.reset_index(drop=True)
    rows.attrs["positions"] = checked.positions
    return rows, checked.refused


def prepare_rows(manifest: pd.DataFrame | str | Path, allow_outside: bool = True) -> pd.DataFrame:
    """The rows an index stores (see `prepare`); a manifest with unusable rows is a ManifestError."""
    return prepare(manifest, allow_outside=allow_outside)[0]


def manifest_digest(rows: pd.DataFrame) -> str:
    """A digest of every stored column of the rows: a resumed build must see the same manifest, and a rerun
    after the commit is recognised as done only for the very same rows."""
    h = hashlib.sha256()
    for col in ("image_id", "study_id", "patient_id", "image_path", "view", "report", "split", "source"):
        h.update("\x1f".join(rows[col].astype(str)).encode())
        h.update(b"\x1e")
    h.update(json.dumps([list(v) for v in rows["labels"]]).encode())
    return h.hexdigest()[:16]


def _shard_path(work: Path, s: int) -> Path:
    return work / f"shard-{s:06d}.npz"


def _plan_sha(plan: dict) -> str:
    return hashlib.sha256(json.dumps(plan, sort_keys=True).encode()).hexdigest()


def read_plan(work: Path) -> dict | None:
    """The plan of an unfinished run in `work` (None when there is none); a damaged one is refused by name."""
    path = work / PLAN_FILE
    if not path.is_file():
        return None
    hint = f"delete {work} to start over (finished shards are only a cache)"
    try:
        doc = json.loads(path.read_bytes())
    except (OSError, ValueError) as e:
        raise IndexError_(f"{path}: damaged build plan ({type(e).__name__}); {hint}") from None
    if (
        not isinstance(doc, dict)
        or not isinstance(doc.get("plan"), dict)
        or doc.get("sha256") != _plan_sha(doc["plan"])
    ):
        raise IndexError_(f"{path}: damaged build plan (its checksum does not match); {hint}")
    return doc["plan"]


def _check_plan(work: Path, plan: dict) -> None:
    """Create plan.json (with its own sha256), or check that the unfinished run in `work` had the same inputs."""
    old = read_plan(work)
    if old is not None:
        diff = [k for k in plan if old.get(k) != plan[k]]
        if diff:
            raise IndexError_(
                f"{work}: an unfinished run with other inputs is here (different {', '.join(diff)}); "
                f"rerun it with the same manifest and model, or delete {work} to start over"
            )
        return
    work.mkdir(parents=True, exist_ok=True)
    write_json_atomic(work / PLAN_FILE, {"plan": plan, "sha256": _plan_sha(plan)})


def _clean_partial(work: Path) -> None:
    """Delete temporary files a killed run left behind (completed shards are never temporary)."""
    clean_temporaries(work)


def _shard_digest(arrays: dict[str, np.ndarray]) -> str:
    h = hashlib.sha256()
    for key in SHARD_KEYS:
        a = np.ascontiguousarray(arrays[key])
        h.update(f"{key}:{a.dtype.str}:{a.shape}".encode())
        h.update(a.tobytes())
    return h.hexdigest()


def load_shard(path: Path, lo: int | None = None, hi: int | None = None, dim: int | None = None) -> dict:
    """One shard's arrays, checked: no pickles, its own sha256, and (given lo/hi) that its good and bad row ids
    are exactly rows lo..hi-1. A damaged shard is an IndexError_ naming the file."""
    hint = f"delete it to re-encode it (or delete {path.parent} to start over)"
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in (*SHARD_KEYS, "sha256")}
    except Exception as e:  # zip, format and pickle refusals come in many types
        why = (str(e).splitlines() or [""])[0][:80]
        raise IndexError_(f"{path}: damaged shard ({type(e).__name__}: {why}); {hint}") from None
    if str(arrays.pop("sha256")) != _shard_digest(arrays):
        raise IndexError_(f"{path}: damaged shard (checksum mismatch); {hint}")
    ids, bad_ids = arrays["ids"], arrays["bad_ids"]
    n = len(ids)
    if arrays["images"].shape[0] != n or arrays["reports"].shape[0] != n or len(arrays["bad_reasons"]) != len(bad_ids):
        raise IndexError_(f"{path}: damaged shard (array lengths disagree); {hint}")
    if lo is not None and hi is not None:
        got = np.sort(np.concatenate([ids, bad_ids]).astype(np.int64))
        if not np.array_equal(got, np.arange(lo, hi)):
            raise IndexError_(f"{path}: shard does not hold rows {lo}..{hi - 1} of this manifest; {hint}")
    if dim is not None and n and (arrays["images"].shape[1] != dim or arrays["reports"].shape[1] != dim):
        raise IndexError_(f"{path}: shard vectors have dim {arrays['images'].shape[1]}, the model {dim}; {hint}")
    return arrays


def _write_shard(path: Path, ids: np.ndarray, img: np.ndarray, txt: np.ndarray, bad: list) -> None:
    arrays = {
        "ids": np.asarray(ids, dtype=np.int64),
        "images": img.astype(np.float32),
        "reports": txt.astype(np.float32),
        "bad_ids": np.asarray([i for i, _ in bad], dtype=np.int64),
        "bad_reasons": np.asarray([r for _, r in bad], dtype=str),
    }
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.savez(f, sha256=np.asarray(_shard_digest(arrays)), **arrays)


def check_shards(work: Path, n: int, shard_rows: int, dim: int) -> None:
    """Refuse a resume over shards that are damaged or belong to other rows (before any new work)."""
    for p in sorted(work.glob("shard-*.npz")):
        try:
            s = int(p.stem.split("-")[1])
        except (IndexError, ValueError):
            raise IndexError_(f"{p}: not a shard of this build; delete {work} to start over") from None
        if s * shard_rows >= n:
            raise IndexError_(f"{p}: beyond the manifest's {n} rows; delete {work} to start over")
        load_shard(p, s * shard_rows, min(n, (s + 1) * shard_rows), dim)


def pending_shards(work: Path, rows: pd.DataFrame, shard_rows: int, dim: int) -> tuple[list[int], int]:
    """(the shards of `rows` not yet in `work`, rows already done), after removing temporaries and checking the
    shards that are there."""
    _clean_partial(work)
    n = len(rows)
    check_shards(work, n, shard_rows, dim)
    n_shards = (n + shard_rows - 1) // shard_rows
    pending = [s for s in range(n_shards) if not _shard_path(work, s).is_file()]
    return pending, n - sum(min(shard_rows, n - s * shard_rows) for s in pending)


def encode_shard(
    work: Path, s: int, lo: int, paths: list[str], texts: list[str], model: Any, batch_size: int, precision: str | None
) -> int:
    """Encode one shard (rows lo.. of the manifest, their image paths and report texts) in this process, without
    DataLoader workers, and write it (the Ray engine's unit of work). Returns how many images were unreadable."""
    from index.encode import stream_image_vectors

    batches = [list(range(b, min(len(paths), b + batch_size))) for b in range(0, len(paths), batch_size)]
    ids_l, vecs_l, bad_l = [], [], []
    for ids, vecs, bad in stream_image_vectors(paths, model, batches, workers=0, precision=precision):
        ids_l.append(ids)
        vecs_l.append(vecs)
        bad_l.extend((lo + i, r) for i, r in bad)
    local = np.concatenate(ids_l).astype(np.int64) if ids_l else np.zeros(0, np.int64)
    img = np.concatenate(vecs_l) if len(local) else np.zeros((0, model.embed_dim), np.float32)
    txt = np.zeros((0, model.embed_dim), np.float32)
    if len(local):
        txt = np.asarray(model.encode_texts([texts[i] for i in local], batch_size=batch_size), np.float32)
    _write_shard(_shard_path(work, s), local + lo, img, txt, bad_l)
    return len(bad_l)


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

    n = len(rows)
    pending, done_rows = pending_shards(work, rows, shard_rows, int(model.embed_dim))
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
                _write_shard(_shard_path(work, s), all_ids, img, txt, bad_l)
                del acc[s]
            encoded += len(ids) + len(bad)
            bar.advance(task, len(ids) + len(bad))
    return encoded, done_rows


def _iter_shards(work: Path, key: str) -> Iterator[np.ndarray]:
    for p in sorted(work.glob("shard-*.npz")):
        with np.load(p, allow_pickle=False) as z:
            yield z[key]


def _collect(work: Path, rows: pd.DataFrame) -> tuple[np.ndarray, pd.DataFrame, int]:
    """The good row ids (manifest order) and the bad rows of a finished shard set, and the vector dim.

    A bad row's `row` is its position in the manifest (rows refused by the validator are not in `rows`)."""
    ids, bad_ids, reasons, dim = [], [], [], 0
    for p in sorted(work.glob("shard-*.npz")):
        z = load_shard(p)
        ids.append(z["ids"])
        bad_ids.extend(z["bad_ids"].tolist())
        reasons.extend(z["bad_reasons"].tolist())
        dim = dim or int(z["images"].shape[1])
    good = np.concatenate(ids) if ids else np.zeros(0, np.int64)
    bad_ids = np.asarray(bad_ids, dtype=np.int64)
    positions = rows.attrs.get("positions")
    positions = np.arange(len(rows)) if positions is None else np.asarray(positions)
    bad = pd.DataFrame(
        {
            "row": positions[bad_ids] if len(bad_ids) else np.zeros(0, np.int64),
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


def _fill(work: Path, key: str, factory: str, dim: int, n: int, opts: BuildOptions | None = None) -> Any:
    index = make_index(factory, dim)
    if not index.is_trained:
        train_index(index, _sample(work, key, n, train_size(index, n)), factory)
    if opts is not None and opts.engine == "ray" and shards.mergeable(index):
        from index.ray_build import fill_shards_ray  # one part per shard on Ray, merged (index/shards.py)

        return fill_shards_ray(index, sorted(work.glob("shard-*.npz")), key, opts.ray_address)
    add_chunks(index, _iter_shards(work, key))
    return index


def _gather(work: Path, key: str, ids: np.ndarray) -> np.ndarray:
    """The vectors of the given (sorted) row ids, read one shard at a time."""
    out, offset = [], 0
    for chunk in _iter_shards(work, key):
        sel = ids[(ids >= offset) & (ids < offset + len(chunk))] - offset
        out.append(chunk[sel])
        offset += len(chunk)
    return np.concatenate(out)


def _tune_from_shards(work: Path, key: str, index: Any, n: int, target: float) -> dict:
    """Tune `index` (filled from the shards in `work`) to `target` recall@10; its record for index_info.json."""
    k = min(tune.K, n - 1)
    if k < 1 or tune.is_exact(index):
        return tune.Tuning({}, 1.0, target, 0, True, max(k, 1), "exact").record()
    ids = tune.sample_ids(n)
    chunks = lambda: _iter_shards(work, key)  # noqa: E731
    queries, qids, truth, scores, how = tune.tuning_queries(index, _gather(work, key, ids), ids, chunks, k)
    result = tune.tune(index, queries, truth, qids, target, scores)
    result.sample = how
    return result.record()


def retune(index: Any, record: dict | None, target: float) -> dict | None:
    """Tune an index again after an add, from the exact vectors it keeps; without them, the old record."""
    vectors = tune.stored_vectors(index)
    if vectors is None or len(vectors) < 2:
        if record is not None:
            tune.apply_params(index, record.get("params", {}))
        return record
    return tune.tune_on_vectors(index, vectors, target).record()


def _warn_unmet(search: dict, factory: str, chosen: bool) -> None:
    for target, rec in search.items():
        if not rec.get("met", True):
            hint = "pick another --factory (or none, for the default rule)" if chosen else "raise --max-memory"
            log.warning(
                "%s index %s reaches only recall@%d %.3f at its best setting (target %.2f); %s",
                target, factory, rec["k"], rec["recall"], rec["target"], hint,
            )  # fmt: skip


def _meta(rows: pd.DataFrame, good: np.ndarray, start: int = 0) -> pd.DataFrame:
    meta = rows.iloc[good].reset_index(drop=True)
    meta.insert(0, "row_id", np.arange(start, start + len(meta), dtype=np.int64))
    meta = meta[store.META_COLUMNS].copy()
    meta.attrs = {}
    return meta


def _manifest_record(manifest: Any, rows: pd.DataFrame, indexed: int, bad: int, digest: str, kind: str) -> dict:
    src = str(Path(manifest).resolve()) if isinstance(manifest, str | Path) else "<DataFrame>"
    return {
        "manifest": src,
        "kind": kind,
        "rows": len(rows),
        "indexed": indexed,
        "bad_images": bad,
        "digest": digest,
        "at": store.now_iso(),
    }


def _all_bad(bad: pd.DataFrame, refused: pd.DataFrame) -> pd.DataFrame:
    """Unreadable images and rows the validator refused, in manifest order: the bad-rows report."""
    frames = [f.astype({"row": np.int64}) for f in (bad, refused) if len(f)]
    if not frames:
        return pd.DataFrame(columns=store.BAD_COLUMNS)
    return pd.concat(frames, ignore_index=True).sort_values("row", kind="stable").reset_index(drop=True)


def _options(opts: BuildOptions | None, **kw: Any) -> BuildOptions:
    opts = opts or BuildOptions()
    for k, v in kw.items():
        if v is not None:
            setattr(opts, k, v)
    return opts


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
    allow_outside: bool = False,
    skip_bad_rows: bool = False,
    options: BuildOptions | None = None,
) -> BuildResult:
    """Build (or resume building) an index folder at `out_dir` from a manifest with `model`.

    Rerunning a build whose result is already committed returns at once (`already_done`)."""
    opts = options or BuildOptions(
        factory, batch_size, workers, shard_rows, model_path, precision, progress, allow_outside, skip_bad_rows
    )
    out = Path(out_dir)
    with store.writer_lock(out):
        return _build(manifest, model, out, opts)


def _done(out: Path, info: dict, digest: str, work: Path, t0: float, kind: str) -> BuildResult | None:
    """The result of an already committed run with this digest (its leftovers removed), else None."""
    rec = next((m for m in info.get("manifests", []) if m.get("digest") == digest), None)
    if rec is None or (kind == "build" and len(info.get("manifests", [])) != 1):
        return None
    shutil.rmtree(work, ignore_errors=True)
    ref = store.resolve(out)
    bad = store.read_bad(out)
    n = int(info["count"])
    log.info("%s: this %s is already committed (%s)", out, kind, ref.name)
    return BuildResult(
        out, n, 0, bad.iloc[0:0], info["factory"], 0, int(rec.get("rows", 0)), time.perf_counter() - t0, True, ref.name,
        search=info.get("search") or {},
    )  # fmt: skip


def _encode_on_ray(work: Path, rows: pd.DataFrame, model: Any, opts: BuildOptions) -> tuple[int, int]:
    """The missing shards encoded by Ray Data actors (index/ray_build.py); (rows encoded now, rows already done)."""
    from index.ray_build import encode_shards_ray

    loader = opts.model_loader or _model_loader(opts.model_path, model, opts.ray_gpus)
    pending, done_rows = pending_shards(work, rows, opts.shard_rows, int(model.embed_dim))
    encoded = encode_shards_ray(
        work, rows, pending, opts.shard_rows, loader, encode_shard, opts.batch_size, opts.precision, opts.ray_actors,
        opts.ray_gpus, opts.ray_address, opts.progress,
    )  # fmt: skip
    return encoded, done_rows


def _model_loader(model_path: Any, model: Any, gpus: float = 0) -> Any:
    """What each Ray actor calls to load the model: the model folder or name the build was given."""
    import functools

    from retrieval.models import load_model

    if model_path is None:
        raise UsageError("--engine ray loads the model in each worker: give the model's folder or name (model_path)")
    device = "cuda" if gpus else "cpu"
    return functools.partial(_load_checked, load_model, str(model_path), str(model.fingerprint), device)


def _load_checked(load: Any, name: str, fingerprint: str, device: str) -> Any:
    model = load(name, device=device)
    if str(model.fingerprint) != fingerprint:
        raise IndexError_(f"{name}: a Ray worker loaded fingerprint {model.fingerprint}, the build has {fingerprint}")
    return model


def _build(manifest: Any, model: Any, out: Path, opts: BuildOptions) -> BuildResult:
    t0 = time.perf_counter()
    work = out / BUILD_DIR
    store.collect_garbage(out)  # leftovers of a killed commit: unfinished generations, temporaries
    if opts.factory is not None:
        make_index(opts.factory, int(model.embed_dim))  # a bad --factory fails now, not after encoding
    if opts.engine not in ("local", "ray"):
        raise UsageError(f"--engine must be 'local' or 'ray', got {opts.engine!r}")
    if opts.engine == "ray":
        from index.ray_build import require_ray

        require_ray()  # a missing extra fails before any work
    if store.has_index(out):
        info = store.read_info(out)
        rows, _ = prepare(manifest, opts.allow_outside, opts.skip_bad_rows)
        same_model = info["model"].get("fingerprint") == str(model.fingerprint)
        same_factory = opts.factory is None or opts.factory == info["factory"]
        done = _done(out, info, manifest_digest(rows), work, t0, "build") if same_model and same_factory else None
        if done is not None:
            return done
        raise IndexError_(f"{out}: already holds an index; extend it with `cxr index add` or choose another --out")
    rows, refused = prepare(manifest, opts.allow_outside, opts.skip_bad_rows)
    if opts.factory is None and opts.max_memory is not None:
        choose_factory(len(rows), int(model.embed_dim), opts.max_memory)  # a budget too small fails before encoding
    digest = manifest_digest(rows)
    _check_plan(
        work,
        {
            "kind": "build",
            "manifest_digest": digest,
            "rows": len(rows),
            "model_fingerprint": str(model.fingerprint),
            "shard_rows": opts.shard_rows,
        },
    )
    if opts.engine == "ray":
        encoded, resumed = _encode_on_ray(work, rows, model, opts)
    else:
        encoded, resumed = encode_shards(
            work, rows, model, opts.batch_size, opts.workers, opts.shard_rows, opts.precision, opts.progress
        )

    good, bad, dim = _collect(work, rows)
    all_bad = _all_bad(bad, refused)
    if len(good) == 0:
        store.write_bad(all_bad, out / store.BAD_FILE)
        raise IndexError_(f"{out}: none of the {len(rows)} images could be read; see {out / store.BAD_FILE}")
    factory = opts.factory or choose_factory(len(good), dim, opts.max_memory)
    images = _fill(work, "images", factory, dim, len(good), opts)
    reports = _fill(work, "reports", factory, dim, len(good), opts)
    search = {
        key: _tune_from_shards(work, key, idx, len(good), opts.target_recall)
        for key, idx in (("images", images), ("reports", reports))
    }
    _warn_unmet(search, factory, opts.factory is not None)
    info = {
        "factory": factory,
        "search": search,
        "normalized": True,
        "model": store.model_record(model, opts.model_path),
        "reports": REPORTS_NOTE,
        "versions": store.versions(),
        "created": store.now_iso(),
        "manifests": [_manifest_record(manifest, rows, len(good), len(all_bad), digest, "build")],
    }
    (out / store.BAD_FILE).unlink(missing_ok=True)  # a failed earlier attempt's list
    gen = store.commit_generation(out, images, reports, _meta(rows, good), info, all_bad)
    shutil.rmtree(work, ignore_errors=True)
    return BuildResult(
        out,
        len(good),
        len(good),
        all_bad,
        factory,
        encoded,
        resumed,
        time.perf_counter() - t0,
        False,
        gen.name,
        refused,
        search,
    )


def add_to_index(
    index_dir: str | Path,
    manifest: pd.DataFrame | str | Path,
    model: Any,
    batch_size: int = 64,
    workers: int = 2,
    shard_rows: int = SHARD_ROWS,
    precision: str | None = None,
    progress: bool = True,
    allow_outside: bool = False,
    skip_bad_rows: bool = False,
    options: BuildOptions | None = None,
) -> BuildResult:
    """Append a manifest's images to an existing index (same model fingerprint, new image_ids) as a new
    generation; resumable, and a rerun after the commit returns at once (`already_done`)."""
    opts = options or BuildOptions(
        None, batch_size, workers, shard_rows, None, precision, progress, allow_outside, skip_bad_rows
    )
    store.read_info(index_dir)  # a missing index is an error before anything is written
    with store.writer_lock(Path(index_dir)):
        return _add(Path(index_dir), manifest, model, opts)


def _add(out: Path, manifest: Any, model: Any, opts: BuildOptions) -> BuildResult:
    t0 = time.perf_counter()
    store.collect_garbage(out)
    current = store.open_index(out, model, full=True)  # the generation this add extends, fully checked
    info = current.info
    rows, refused = prepare(manifest, opts.allow_outside, opts.skip_bad_rows)
    digest = manifest_digest(rows)
    work = out / ADD_DIR
    done = _done(out, info, digest, work, t0, "add")
    if done is not None:
        return done
    base = current.count
    existing = set(current.meta["image_id"])
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
            "shard_rows": opts.shard_rows,
        },
    )
    encoded, resumed = encode_shards(
        work, rows, model, opts.batch_size, opts.workers, opts.shard_rows, opts.precision, opts.progress
    )
    good, bad, _ = _collect(work, rows)
    images, reports = current.images, current.reports  # in memory: the files of the old generation stay as they are
    add_chunks(images, _iter_shards(work, "images"))
    add_chunks(reports, _iter_shards(work, "reports"))
    meta = pd.concat([current.meta, _meta(rows, good, start=base)], ignore_index=True)
    new_bad = _all_bad(bad, refused).astype(str)
    old_bad = store.read_bad(out)
    all_bad = pd.concat([old_bad, new_bad], ignore_index=True).drop_duplicates(subset=["image_id", "path"])
    info = {k: v for k, v in info.items() if k != "files"}
    old_search = info.get("search") or {}
    search = {
        key: retune(idx, old_search.get(key), (old_search.get(key) or {}).get("target", opts.target_recall))
        for key, idx in (("images", images), ("reports", reports))
    }
    if all(v is not None for v in search.values()):
        info["search"] = search
        _warn_unmet(search, info["factory"], True)
    info["updated"] = store.now_iso()
    info["manifests"] = list(info.get("manifests", [])) + [
        _manifest_record(manifest, rows, len(good), len(new_bad), digest, "add")
    ]
    gen = store.commit_generation(out, images, reports, meta, info, all_bad)
    shutil.rmtree(work, ignore_errors=True)
    return BuildResult(
        out,
        base + len(good),
        len(good),
        new_bad,
        info["factory"],
        encoded,
        resumed,
        time.perf_counter() - t0,
        False,
        gen.name,
        refused,
        info.get("search") or {},
    )
