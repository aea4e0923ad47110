"""Streaming, resumable index builds (`cxr index build`) and appends (`cxr index add`).

How a build survives a kill at any moment (SIGKILL included):

* The manifest first goes through the shared validator (`retrieval.data.manifest_check.check_manifest`): rows with
  empty ids, unparseable labels, unknown splits or paths outside the manifest folder (without
  `allow_outside`) fail the command before any work, or are skipped into bad_images.csv (`skip_bad_rows`).
* The rows are cut into fixed shards of `shard_rows` consecutive rows. Each shard is encoded (images in
  DataLoader workers, reports with `encode_texts`) and written as ONE file, `OUT/.build/shard-NNNNNN.npz`
  (row ids, image vectors, report vectors, bad rows + reasons, and a sha256 of them all), under a temporary
  name renamed into place. A shard that fails its checksum or does not cover its rows is refused by name.
* Each shard records its binding (a digest of its rows, the model and the options that change its vectors): a
  resume reuses only shards whose binding matches, so a lost plan.json never lets another manifest's shards in.
* `OUT/.build/plan.json` pins the manifest (a digest of its rows), the model fingerprint and the shard size,
  and carries its own sha256: a rerun with the same inputs encodes only the missing shards; other inputs, or a
  damaged plan, are refused with one line.
* When every shard is there, the FAISS indexes are trained (on a sample) and filled shard by shard (with
  `--engine ray`: one part per shard filled by a Ray task, the parts merged in shard order; index/merge.py), and the
  result is committed as a new generation (index/store.py: files fsynced and hashed, then CURRENT switched).
  Rows come out in manifest order, so a resumed build equals an uninterrupted one.
* A rerun after the commit (a kill between the commit and the clean-up, or simply the same command twice)
  finds its manifest recorded in the current generation, removes the leftovers and exits 0 saying so.

Memory stays flat in the number of images apart from the vectors themselves (and the manifest's metadata):
only one shard of vectors is held while encoding, and one shard at a time is read while filling FAISS.
"""

from __future__ import annotations

import logging
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from index import abstain, generations, layout, merge, store, tune
from index.factory import add_chunks, choose_factory, make_index, train_index, train_size
from index.rows import manifest_digest, prepare
from index.shards import (
    SHARD_ROWS,
    check_plan,
    collect,
    encode_shard,
    encode_shards,
    gather,
    iter_shards,
    pending_shards,
    sample,
    shard_bindings,
)
from retrieval.errors import IndexError_, UsageError

log = logging.getLogger(__name__)
BUILD_DIR = ".build"
ADD_DIR = ".add"
REPORTS_NOTE = (
    "one report vector per image row (same row ids as images.faiss; a study's report repeats per image); "
    "report searches return each study once"
)


@dataclass(kw_only=True)
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


def _fill(work: Path, key: str, factory: str, dim: int, n: int, opts: BuildOptions | None = None) -> Any:
    index = make_index(factory, dim)
    if not index.is_trained:
        train_index(index, sample(work, key, n, train_size(index, n)), factory)
    if opts is not None and opts.engine == "ray" and merge.mergeable(index):
        from index.ray_build import fill_shards_ray  # one part per shard on Ray, merged (index/merge.py)

        return fill_shards_ray(index, sorted(work.glob("shard-*.npz")), key, opts.ray_address)
    add_chunks(index, iter_shards(work, key))
    return index


def _tune_from_shards(work: Path, key: str, index: Any, n: int, target: float, pick_coarse: bool) -> dict:
    """Tune `index` (filled from the shards in `work`) to `target` recall@10; its record for index_info.json. With
    `pick_coarse` (the default rule's IVF), the coarse quantizer is chosen too (index/coarse.py)."""
    k = min(tune.K, n - 1)
    if k < 1 or tune.is_exact(index):
        return tune.Tuning({}, 1.0, target, 0, True, max(k, 1), "exact").record()
    ids = tune.sample_ids(n)
    chunks = lambda: iter_shards(work, key)  # noqa: E731
    queries, qids, truth, scores, how = tune.tuning_queries(index, gather(work, key, ids), ids, chunks, k)
    result = tune.tune_index(index, queries, truth, qids, target, scores, pick_coarse)
    result.sample = how
    return result.record()


def _calibrate_abstain(work: Path, images: Any, reports: Any, meta: pd.DataFrame) -> dict:
    """The no-close-match thresholds (index/abstain.py) from a seeded sample of the collection's own rows."""
    ids = tune.sample_ids(len(meta), abstain.QUERIES)
    vectors = {key: gather(work, key, ids) for key in ("images", "reports")}
    return abstain.calibrate({"images": images, "reports": reports}, vectors, ids, meta["patient_id"].to_numpy())


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
    meta = meta[layout.META_COLUMNS + [c for c in layout.OPTIONAL_META_COLUMNS if c in meta.columns]].copy()
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
        "at": layout.now_iso(),
    }


def _all_bad(bad: pd.DataFrame, refused: pd.DataFrame) -> pd.DataFrame:
    """Unreadable images and rows the validator refused, in manifest order: the bad-rows report."""
    frames = [f.astype({"row": np.int64}) for f in (bad, refused) if len(f)]
    if not frames:
        return pd.DataFrame(columns=store.BAD_COLUMNS)
    return pd.concat(frames, ignore_index=True).sort_values("row", kind="stable").reset_index(drop=True)


def build_index(
    manifest: pd.DataFrame | str | Path, model: Any, out_dir: str | Path, options: BuildOptions | None = None
) -> BuildResult:
    """Build (or resume building) an index folder at `out_dir` from a manifest with `model`, as `options` say.

    Rerunning a build whose result is already committed returns at once (`already_done`)."""
    out = Path(out_dir)
    with generations.writer_lock(out):
        return _build(manifest, model, out, options or BuildOptions())


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
    from index.ray_build import encode_shards_ray, model_loader

    loader = opts.model_loader or model_loader(opts.model_path, model, opts.ray_gpus)
    bindings = shard_bindings(rows, opts.shard_rows, model.fingerprint, opts.precision)
    pending, done_rows = pending_shards(work, rows, opts.shard_rows, int(model.embed_dim), bindings)
    encoded = encode_shards_ray(
        work, rows, pending, opts.shard_rows, loader, encode_shard, opts.batch_size, opts.precision, opts.ray_actors,
        opts.ray_gpus, opts.ray_address, opts.progress, bindings,
    )  # fmt: skip
    return encoded, done_rows


def _encode(work: Path, kind: str, digest: str, rows: pd.DataFrame, model: Any, opts: BuildOptions) -> tuple[int, int]:
    """Pin the run's inputs in `work` (plan.json), then encode the shards not yet there, with the engine `opts`
    name (an add always runs locally); (rows encoded now, rows already done)."""
    plan = {"kind": kind, "manifest_digest": digest, "rows": len(rows), "model_fingerprint": str(model.fingerprint)}
    check_plan(work, {**plan, "shard_rows": opts.shard_rows})
    if kind == "build" and opts.engine == "ray":
        return _encode_on_ray(work, rows, model, opts)
    return encode_shards(
        work, rows, model, opts.batch_size, opts.workers, opts.shard_rows, opts.precision, opts.progress
    )


def _check_options(model: Any, opts: BuildOptions) -> None:
    """A bad --factory, --engine or a missing Ray fail now, not after encoding."""
    if opts.factory is not None:
        make_index(opts.factory, int(model.embed_dim))
    if opts.engine not in ("local", "ray"):
        raise UsageError(f"--engine must be 'local' or 'ray', got {opts.engine!r}")
    if opts.engine == "ray":
        from index.ray_build import require_ray

        require_ray()


def _build(manifest: Any, model: Any, out: Path, opts: BuildOptions) -> BuildResult:
    t0 = time.perf_counter()
    work = out / BUILD_DIR
    if not store.has_index(out) and generations.generations(out):  # a kill between the commit and its pointer?
        rows, _ = prepare(manifest, opts.allow_outside, opts.skip_bad_rows)
        generations.adopt_first_commit(out, manifest_digest(rows), str(model.fingerprint))
    generations.collect_garbage(out)  # leftovers of a killed commit: unfinished generations, temporaries
    _check_options(model, opts)
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
    encoded, resumed = _encode(work, "build", digest, rows, model, opts)
    good, bad, dim = collect(work, rows)
    all_bad = _all_bad(bad, refused)
    if len(good) == 0:
        generations.write_bad(all_bad, out / store.BAD_FILE)
        raise IndexError_(f"{out}: none of the {len(rows)} images could be read; see {out / store.BAD_FILE}")
    factory = opts.factory or choose_factory(len(good), dim, opts.max_memory)
    images = _fill(work, "images", factory, dim, len(good), opts)
    reports = _fill(work, "reports", factory, dim, len(good), opts)
    search = {
        key: _tune_from_shards(work, key, idx, len(good), opts.target_recall, opts.factory is None)
        for key, idx in (("images", images), ("reports", reports))
    }
    _warn_unmet(search, factory, opts.factory is not None)
    meta = _meta(rows, good)
    info = {
        "factory": factory,
        "search": search,
        "abstain": _calibrate_abstain(work, images, reports, meta),
        "normalized": True,
        "model": store.model_record(model, opts.model_path),
        "reports": REPORTS_NOTE,
        "versions": layout.versions(),
        "created": layout.now_iso(),
        "manifests": [_manifest_record(manifest, rows, len(good), len(all_bad), digest, "build")],
    }
    (out / store.BAD_FILE).unlink(missing_ok=True)  # a failed earlier attempt's list
    gen = generations.commit_generation(out, images, reports, meta, info, all_bad)
    shutil.rmtree(work, ignore_errors=True)
    return BuildResult(
        out, len(good), len(good), all_bad, factory, encoded, resumed, time.perf_counter() - t0, False, gen.name,
        refused, search,
    )  # fmt: skip


def add_to_index(
    index_dir: str | Path, manifest: pd.DataFrame | str | Path, model: Any, options: BuildOptions | None = None
) -> BuildResult:
    """Append a manifest's images to an existing index (same model fingerprint, new image_ids) as a new
    generation; resumable, and a rerun after the commit returns at once (`already_done`). `options.factory`,
    `engine` and `max_memory` do not apply (the index keeps its type)."""
    store.read_info(index_dir)  # a missing index is an error before anything is written
    with generations.writer_lock(Path(index_dir)):
        return _add(Path(index_dir), manifest, model, options or BuildOptions())


def _add(out: Path, manifest: Any, model: Any, opts: BuildOptions) -> BuildResult:
    t0 = time.perf_counter()
    generations.collect_garbage(out)
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
    encoded, resumed = _encode(work, "add", digest, rows, model, opts)
    good, bad, _ = collect(work, rows)
    images, reports = current.images, current.reports  # in memory: the files of the old generation stay as they are
    add_chunks(images, iter_shards(work, "images"))
    add_chunks(reports, iter_shards(work, "reports"))
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
    info["updated"] = layout.now_iso()
    info["manifests"] = list(info.get("manifests", [])) + [
        _manifest_record(manifest, rows, len(good), len(new_bad), digest, "add")
    ]
    gen = generations.commit_generation(out, images, reports, meta, info, all_bad)
    shutil.rmtree(work, ignore_errors=True)
    return BuildResult(
        out, base + len(good), len(good), new_bad, info["factory"], encoded, resumed, time.perf_counter() - t0, False,
        gen.name, refused, info.get("search") or {},
    )  # fmt: skip
