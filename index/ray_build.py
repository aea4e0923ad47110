"""`cxr index build --engine ray`: the shards of a build encoded by Ray Data actors, for corpora that outgrow one
machine (clip-retrieval / autofaiss style: reader -> mapper -> writer).

    manifest rows -> one Ray Data row per missing shard (row range, image paths, report texts)
      -> map_batches(ShardEncoder): a pool of stateful actors, each loading the model once (CPU here,
         `num_gpus=1` per actor on a GPU cluster), decodes and embeds its shard's images and reports and writes
         OUT/.build/shard-NNNNNN.npz itself (row ids, vectors, bad rows, sha256; temp name renamed into place)
      -> the driver trains FAISS once on a sample of the shards; then one Ray task per shard adds that shard's
         vectors to a copy of the trained index and the driver merges the parts in shard order (index/merge.py,
         the autofaiss way; the result equals the single-process build's). An index faiss cannot merge (HNSW) is
         filled on the driver, shard after shard.

The shard files are the same as the default engine's, so everything else carries over: the plan that pins the
inputs, resume at shard level (a rerun encodes only the missing shards, with either engine), the checks of each
shard, tuning and the atomic commit. On a cluster, OUT must be on storage every node sees (NFS, a mounted bucket).

Ray is an optional extra: `pip install 'cxr-retrieval[ray]'`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from retrieval.errors import IndexError_, UsageError

log = logging.getLogger(__name__)


def require_ray() -> Any:
    """The `ray` module with Ray Data, or a usage error naming the extra to install."""
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError:
        raise UsageError("--engine ray needs Ray Data: pip install 'cxr-retrieval[ray]' (or 'ray[data]')") from None
    return ray


def model_loader(model_path: Any, model: Any, gpus: float = 0) -> Any:
    """What each Ray actor calls to load the model: the model folder or name the build was given."""
    import functools

    from retrieval.models import load_model

    if model_path is None:
        raise UsageError("--engine ray loads the model in each worker: give the model's folder or name (model_path)")
    device = "cuda" if gpus else "cpu"
    return functools.partial(load_checked, load_model, str(model_path), str(model.fingerprint), device)


def load_checked(load: Any, name: str, fingerprint: str, device: str) -> Any:
    model = load(name, device=device)
    if str(model.fingerprint) != fingerprint:
        raise IndexError_(f"{name}: a Ray worker loaded fingerprint {model.fingerprint}, the build has {fingerprint}")
    return model


def _connect(ray: Any, address: str | None) -> None:
    """Join the cluster at `address` (or the one this process already runs), else start a local one."""
    if not ray.is_initialized():
        ray.init(address=address, log_to_driver=False) if address else ray.init(log_to_driver=False)


class ShardEncoder:
    """A Ray Data actor: loads the model once, then encodes and writes whole shards (one input row per shard)."""

    def __init__(
        self,
        load_model: Callable[[], Any],
        encode: Callable[..., int],
        work: str,
        batch_size: int,
        precision: str | None,
    ):
        import faiss
        import torch

        torch.set_num_threads(1)  # one core per actor: the pool is the parallelism
        faiss.omp_set_num_threads(1)
        self.model = load_model()
        self.encode = encode  # index.shards.encode_shard, passed in
        self.work = Path(work)
        self.batch_size = batch_size
        self.precision = precision

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        done, bad = [], []
        cols = (batch["shard"], batch["lo"], batch["paths"], batch["texts"], batch["binding"])
        for s, lo, paths, texts, binding in zip(*cols, strict=True):
            n_bad = self.encode(
                self.work, int(s), int(lo), list(paths), list(texts), self.model, self.batch_size, self.precision,
                str(binding),
            )  # fmt: skip
            done.append(int(s))
            bad.append(n_bad)
        return {"shard": np.asarray(done, dtype=np.int64), "bad": np.asarray(bad, dtype=np.int64)}


def encode_shards_ray(
    work: Path,
    rows: pd.DataFrame,
    pending: list[int],
    shard_rows: int,
    load_model: Callable[[], Any],
    encode: Callable[..., int],
    batch_size: int = 64,
    precision: str | None = None,
    actors: int | None = None,
    num_gpus: float = 0,
    address: str | None = None,
    progress: bool = True,
    bindings: list[str] | None = None,
) -> int:
    """Encode the `pending` shards on Ray (an actor pool of `actors`, default: the cluster's CPUs, or one per GPU
    with `num_gpus`); returns the rows encoded. Joins the cluster at `address` (or the one this process already
    runs), else starts a local one. `encode(work, shard, lo, paths, texts, model, batch_size, precision, binding)`
    encodes and writes one shard (`index.shards.encode_shard`); `bindings` holds each shard's binding."""
    ray = require_ray()
    from retrieval.progress import make_progress

    if not pending:
        return 0
    _connect(ray, address)
    n = len(rows)
    paths = rows["image_path"].tolist()
    texts = rows["report"].tolist()
    items = []
    for s in pending:
        lo, hi = s * shard_rows, min(n, (s + 1) * shard_rows)
        binding = bindings[s] if bindings is not None else ""
        items.append({"shard": s, "lo": lo, "paths": paths[lo:hi], "texts": texts[lo:hi], "binding": binding})
    if actors is None:
        cpus = int(ray.cluster_resources().get("CPU", 1))
        gpus = int(ray.cluster_resources().get("GPU", 0))
        actors = max(1, gpus if num_gpus else cpus)
    actors = max(1, min(actors, len(items)))
    log.info("encoding %d shard(s) on Ray with %d actor(s)", len(items), actors)
    ds = ray.data.from_items(items, override_num_blocks=len(items))
    out = ds.map_batches(
        ShardEncoder,
        fn_constructor_kwargs={
            "load_model": load_model,
            "encode": encode,
            "work": str(work),
            "batch_size": batch_size,
            "precision": precision,
        },
        batch_size=1,
        compute=ray.data.ActorPoolStrategy(size=actors),
        num_cpus=1,
        num_gpus=num_gpus,
    )
    encoded = 0
    with make_progress(disable=not progress) as bar:
        task = bar.add_task("Encoding shards (Ray)", total=n, completed=n - sum(len(i["paths"]) for i in items))
        for b in out.iter_batches(batch_size=1):
            for s in b["shard"].tolist():
                size = min(n, (s + 1) * shard_rows) - s * shard_rows
                encoded += size
                bar.advance(task, size)
    return encoded


def _fill_part(trained: np.ndarray, path: str, key: str) -> np.ndarray:
    """A Ray task: one shard file's `key` vectors added to a copy of the trained index (serialized in and out)."""
    import faiss

    from index import merge

    faiss.omp_set_num_threads(1)  # one core per task: the tasks are the parallelism
    with np.load(path, allow_pickle=False) as z:
        vectors = z[key]
    return merge.to_bytes(merge.fill_part(merge.from_bytes(trained), vectors))


def fill_shards_ray(trained: Any, paths: list[Path], key: str, address: str | None = None) -> Any:
    """The trained (mergeable) index filled from the shard files: one Ray task per shard, parts merged on the
    driver in the order of `paths` (their rows' order), one part held at a time."""
    ray = require_ray()
    from index import merge

    if not merge.mergeable(trained):
        raise UsageError(f"{type(trained).__name__} cannot be merged from shards")
    _connect(ray, address)
    ref = ray.put(merge.to_bytes(trained))
    task = ray.remote(num_cpus=1)(_fill_part)
    refs = [task.remote(ref, str(p), key) for p in paths]
    log.info("filling %s from %d shard(s) on Ray, then merging", key, len(refs))
    return merge.merge_parts(merge.from_bytes(ray.get(r)) for r in refs) if refs else trained
