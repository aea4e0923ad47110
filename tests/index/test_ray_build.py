"""`cxr index build --engine ray` (a local Ray with 2 CPUs) builds the same index as the default engine: same ids,
vectors within 1e-5, same search results, same bad-image list; it resumes at shard level."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import faiss
import numpy as np
import pandas as pd
import pytest
from index_helpers import FakeModel, make_corpus
from repo_paths import HELPERS, REPO

from index import build as build_mod
from index import store
from index.build import BUILD_DIR, BuildOptions, build_index
from index.search import Searcher
from index.shards import iter_shards
from retrieval.errors import UsageError

faiss.omp_set_num_threads(1)


@pytest.fixture(scope="module")
def ray_local():
    ray = pytest.importorskip("ray", reason="the 'ray' extra is not installed")
    # the actors import this checkout (and FakeModel from tests/), not whatever else is installed
    path = os.pathsep.join([str(REPO), str(HELPERS), os.environ.get("PYTHONPATH", "")])
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, runtime_env={"env_vars": {"PYTHONPATH": path}})
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    return make_corpus(tmp_path_factory.mktemp("corpus"), n=40)


@pytest.fixture(scope="module")
def reference(corpus, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("local") / "index"
    build_index(corpus, FakeModel(), out, options=BuildOptions(shard_rows=8, workers=0, progress=False))
    return out


def _ray_opts(**kw) -> BuildOptions:
    return BuildOptions(shard_rows=8, workers=0, progress=False, engine="ray", model_loader=FakeModel, **kw)


def _same_index(a: Path, b: Path) -> None:
    x, y = store.open_index(a, FakeModel()), store.open_index(b, FakeModel())
    assert list(x.meta["image_id"]) == list(y.meta["image_id"])
    pd.testing.assert_frame_equal(x.meta, y.meta)
    for key in ("images", "reports"):
        vx, vy = x.target(key).reconstruct_n(0, x.count), y.target(key).reconstruct_n(0, y.count)
        np.testing.assert_allclose(vx, vy, atol=1e-5)
    pd.testing.assert_frame_equal(store.read_bad(a), store.read_bad(b))
    q = x.images.reconstruct_n(0, 12) + 0.05
    for target in ("images", "reports"):
        sx, ix = Searcher(a).search_ids(q, k=5, target=target)
        sy, iy = Searcher(b).search_ids(q, k=5, target=target)
        np.testing.assert_allclose(sx, sy, atol=1e-5)
        _same_hits_up_to_ties(sx, ix, iy)


def _same_hits_up_to_ties(scores: np.ndarray, ix: np.ndarray, iy: np.ndarray, tie: float = 1e-5) -> None:
    """The same ids, up to the order of rows tied (within `tie`) in score: a report is stored once per image of its
    study, so its copies score alike to the last float bit or two, and which copy comes first then depends on
    rounding in the encoder (Ray's actors run torch on one thread). Each run of tied positions must hold the same
    ids; the run that reaches the k-th position may hold different ones (rows tied with the k-th, in or out of the
    top k, are all right answers; the scores, compared separately, are the same)."""
    for s, x, y in zip(scores, ix, iy, strict=True):
        for j in range(len(s)):
            run = np.flatnonzero(np.abs(s - s[j]) <= tie)
            if run.max() < len(s) - 1:
                assert set(x[run]) == set(y[run]), (x, y, s)


def test_the_ray_engine_builds_the_same_index_and_resumes_at_shard_level(
    ray_local, corpus, reference, tmp_path, monkeypatch
):
    """One Ray build killed after its shards were written (each pass starts an actor pool: slow on 2 cores),
    two shards removed, then resumed: only those are encoded again, and the result equals the default engine's."""
    out = tmp_path / "ray"

    def killed(*_a, **_k):
        raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(build_mod, "collect", killed)
        with pytest.raises(KeyboardInterrupt):
            build_index(corpus, FakeModel(), out, options=_ray_opts())
    shards = sorted((out / BUILD_DIR).glob("shard-*.npz"))
    assert len(shards) == 6  # 42 rows (2 unreadable) / 8
    for p in shards[1:3]:
        p.unlink()
    result = build_index(corpus, FakeModel(), out, options=_ray_opts())
    assert result.count == 40 and len(result.bad) == 2
    assert result.encoded_rows == 16 and result.resumed_rows == 26
    _same_index(reference, out)


@pytest.mark.parametrize("factory", ["Flat", "IVF8,PQ16x4fs,RFlat"])
def test_ray_parts_merged_equal_the_shard_after_shard_fill(ray_local, tmp_path, factory):
    """`fill_shards_ray` (one Ray task per shard file, parts merged on the driver; index/merge.py) against the
    default engine's fill of the same shard files: same ids, vectors and search results, ties included (every
    vector is stored four times)."""
    from index import ray_build
    from index.factory import add_chunks, make_index, train_index

    rng = np.random.default_rng(0)
    distinct = rng.standard_normal((300, 32)).astype(np.float32)
    x = distinct[np.arange(1200) % 300] / np.linalg.norm(distinct[np.arange(1200) % 300], axis=1, keepdims=True)
    paths = []
    for s, lo in enumerate(range(0, len(x), 250)):  # uneven: the last shard is shorter
        paths.append(tmp_path / f"shard-{s:06d}.npz")
        np.savez(paths[-1], images=x[lo : lo + 250])
    trained = make_index(factory, 32)
    train_index(trained, x, factory)
    local = faiss.clone_index(trained)
    add_chunks(local, iter_shards(tmp_path, "images"))
    merged = ray_build.fill_shards_ray(trained, paths, "images")
    assert merged.ntotal == local.ntotal == len(x)
    for index in (local, merged):
        if factory != "Flat":
            faiss.ParameterSpace().set_index_parameter(index, "nprobe", 4)
            faiss.ParameterSpace().set_index_parameter(index, "k_factor_rf", 4)
    np.testing.assert_array_equal(merged.reconstruct_n(0, len(x)), local.reconstruct_n(0, len(x)))
    q = x[:50] + 0.01
    dl, il = local.search(q, 10)
    dm, im = merged.search(q, 10)
    np.testing.assert_array_equal(im, il)
    np.testing.assert_allclose(dm, dl, atol=1e-6)


def test_a_missing_ray_is_one_clear_error(corpus, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)
    with pytest.raises(UsageError, match=r"pip install 'cxr-retrieval\[ray\]'"):
        build_index(corpus, FakeModel(), tmp_path / "x", options=_ray_opts())
    assert not (tmp_path / "x" / BUILD_DIR).exists()
    shutil.rmtree(tmp_path / "x", ignore_errors=True)
