"""The shards of a build or add: the plan that pins a run's inputs, encoding rows into checksummed shard files,
and reading them back (for filling FAISS, sampling, and the tuning queries).

`OUT/.build/plan.json` (or `.add/`) pins the manifest digest, the model fingerprint and the shard size, with its
own sha256. Shard s holds rows s*shard_rows .. (s+1)*shard_rows - 1 as ONE file, `shard-NNNNNN.npz` (row ids,
image vectors, report vectors, bad rows + reasons, its binding, and a sha256 of them all), renamed into place; a
shard that fails its checksum or does not cover its rows is refused by name. The binding is a digest of the rows
the shard encodes, the model fingerprint and the options that change its vectors (`shard_bindings`), so a resume
that lost its plan.json reuses only the shards made from the very same inputs: any other shard is dropped with a
warning and encoded again. See index/build.py for how a run resumes.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from index.layout import BAD_COLUMNS
from index.rows import manifest_digest
from retrieval.errors import IndexError_
from retrieval.fileio import atomic_path, clean_temporaries, write_json_atomic

log = logging.getLogger(__name__)
SHARD_ROWS = 1024


PLAN_FILE = "plan.json"


SHARD_KEYS = ("ids", "images", "reports", "bad_ids", "bad_reasons")
BINDING = "binding"  # absent from the shards of earlier releases: those are never reused


def shard_bindings(rows: pd.DataFrame, shard_rows: int, fingerprint: str, precision: str | None) -> list[str]:
    """Each shard's binding: a digest of its rows (every stored column), the model and the options its vectors
    depend on. A shard is reused only where its binding is the one its position expects."""
    opts = json.dumps({"model": str(fingerprint), "shard_rows": int(shard_rows), "precision": str(precision)})
    out = []
    for lo in range(0, len(rows), shard_rows):
        digest = manifest_digest(rows.iloc[lo : lo + shard_rows])
        out.append(hashlib.sha256(f"{opts}\x1e{digest}".encode()).hexdigest())
    return out


def shard_path(work: Path, s: int) -> Path:
    return work / f"shard-{s:06d}.npz"


def plan_sha(plan: dict) -> str:
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
    if not isinstance(doc, dict) or not isinstance(doc.get("plan"), dict) or doc.get("sha256") != plan_sha(doc["plan"]):
        raise IndexError_(f"{path}: damaged build plan (its checksum does not match); {hint}")
    return doc["plan"]


def check_plan(work: Path, plan: dict) -> None:
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
    write_json_atomic(work / PLAN_FILE, {"plan": plan, "sha256": plan_sha(plan)})


def shard_digest(arrays: dict[str, np.ndarray]) -> str:
    h = hashlib.sha256()
    for key in (*SHARD_KEYS, BINDING):
        if key not in arrays:
            continue
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
            arrays = {k: z[k] for k in (*SHARD_KEYS, "sha256", BINDING) if k != BINDING or k in z.files}
    except Exception as e:  # zip, format and pickle refusals come in many types
        why = (str(e).splitlines() or [""])[0][:80]
        raise IndexError_(f"{path}: damaged shard ({type(e).__name__}: {why}); {hint}") from None
    if str(arrays.pop("sha256")) != shard_digest(arrays):
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


def write_shard(path: Path, ids: np.ndarray, img: np.ndarray, txt: np.ndarray, bad: list, binding: str) -> None:
    arrays = {
        BINDING: np.asarray(binding),
        "ids": np.asarray(ids, dtype=np.int64),
        "images": img.astype(np.float32),
        "reports": txt.astype(np.float32),
        "bad_ids": np.asarray([i for i, _ in bad], dtype=np.int64),
        "bad_reasons": np.asarray([r for _, r in bad], dtype=str),
    }
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.savez(f, sha256=np.asarray(shard_digest(arrays)), **arrays)


def check_shards(work: Path, n: int, shard_rows: int, dim: int, bindings: list[str]) -> None:
    """Before any new work: drop (with a warning) the shards made from other rows, another model or other options,
    and refuse a resume over shards that are damaged."""
    for p in sorted(work.glob("shard-*.npz")):
        try:
            s = int(p.stem.split("-")[1])
        except (IndexError, ValueError):
            raise IndexError_(f"{p}: not a shard of this build; delete {work} to start over") from None
        stored = str(load_shard(p).get(BINDING, ""))  # a damaged shard is refused by name here
        if s >= len(bindings) or stored != bindings[s]:
            log.warning("%s: made from other rows, another model or other options; encoding it again", p)
            p.unlink()
            continue
        load_shard(p, s * shard_rows, min(n, (s + 1) * shard_rows), dim)


def pending_shards(
    work: Path, rows: pd.DataFrame, shard_rows: int, dim: int, bindings: list[str]
) -> tuple[list[int], int]:
    """(the shards of `rows` not yet in `work`, rows already done), after removing temporaries, dropping shards of
    other inputs and checking the shards that are there."""
    clean_temporaries(work)  # what a killed run left: completed shards are never temporary
    n = len(rows)
    check_shards(work, n, shard_rows, dim, bindings)
    n_shards = (n + shard_rows - 1) // shard_rows
    pending = [s for s in range(n_shards) if not shard_path(work, s).is_file()]
    return pending, n - sum(min(shard_rows, n - s * shard_rows) for s in pending)


def encode_shard(
    work: Path,
    s: int,
    lo: int,
    paths: list[str],
    texts: list[str],
    model: Any,
    batch_size: int,
    precision: str | None,
    binding: str,
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
    write_shard(shard_path(work, s), local + lo, img, txt, bad_l, binding)
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
    bindings = shard_bindings(rows, shard_rows, model.fingerprint, precision)
    pending, done_rows = pending_shards(work, rows, shard_rows, int(model.embed_dim), bindings)
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
                write_shard(shard_path(work, s), all_ids, img, txt, bad_l, bindings[s])
                del acc[s]
            encoded += len(ids) + len(bad)
            bar.advance(task, len(ids) + len(bad))
    return encoded, done_rows


def iter_shards(work: Path, key: str) -> Iterator[np.ndarray]:
    for p in sorted(work.glob("shard-*.npz")):
        with np.load(p, allow_pickle=False) as z:
            yield z[key]


def collect(work: Path, rows: pd.DataFrame) -> tuple[np.ndarray, pd.DataFrame, int]:
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
        columns=BAD_COLUMNS,
    )
    return good, bad.sort_values("row").reset_index(drop=True), dim


def sample(work: Path, key: str, n_total: int, n_sample: int) -> np.ndarray:
    """A seeded random sample of `n_sample` vectors across all shards, read one shard at a time."""
    if n_sample >= n_total:
        return np.concatenate(list(iter_shards(work, key)))
    return gather(work, key, np.sort(np.random.default_rng(0).choice(n_total, n_sample, replace=False)))


def gather(work: Path, key: str, ids: np.ndarray) -> np.ndarray:
    """The vectors of the given (sorted) row ids, read one shard at a time."""
    out, offset = [], 0
    for chunk in iter_shards(work, key):
        sel = ids[(ids >= offset) & (ids < offset + len(chunk))] - offset
        out.append(chunk[sel])
        offset += len(chunk)
    return np.concatenate(out)
