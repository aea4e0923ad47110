"""Shards are bound to the rows, model and options they encode: a resume that lost its plan.json reuses only the
shards that match (issue 29, item 1)."""

from __future__ import annotations

import shutil
from pathlib import Path

import faiss
import numpy as np
import pytest
from index_helpers import FakeModel, make_corpus

from index import store
from index.build import ADD_DIR, BUILD_DIR, BuildOptions, add_to_index, build_index
from index.rows import prepare
from index.shards import PLAN_FILE, encode_shards, load_shard, shard_bindings, shard_path
from retrieval.data.manifest import read_manifest, write_manifest

faiss.omp_set_num_threads(1)
OPTS = {"batch_size": 4, "workers": 0, "shard_rows": 8, "progress": False}


@pytest.fixture(scope="module")
def manifests(tmp_path_factory) -> tuple[Path, Path]:
    """A and B: the same length and the same images, but B's rows in another order with other ids and reports."""
    folder = tmp_path_factory.mktemp("corpus")
    a = make_corpus(folder, n=32, bad=False)
    df = read_manifest(a)
    b_df = df.iloc[::-1].reset_index(drop=True)
    b_df["image_id"] = [f"b-{i}" for i in range(len(b_df))]
    b_df["report"] = [f"other report number {i}" for i in range(len(b_df))]
    b = folder / "b.parquet"
    write_manifest(b_df, b)
    return a, b


def _partial_run(work: Path, manifest: Path, keep: int) -> None:
    """What a killed run of `manifest` leaves in `work` after `keep` shards, with its plan.json then deleted."""
    rows, _ = prepare(manifest)
    encode_shards(work, rows, FakeModel(), batch_size=4, workers=0, shard_rows=8, progress=False)
    for p in sorted(work.glob("shard-*.npz"))[keep:]:
        p.unlink()
    (work / PLAN_FILE).unlink(missing_ok=True)  # encode_shards alone writes none: as if it was deleted


def _vectors(folder: Path) -> tuple[np.ndarray, np.ndarray]:
    idx = store.open_index(folder)
    return idx.images.reconstruct_n(0, idx.count), idx.reports.reconstruct_n(0, idx.count)


def test_a_build_without_its_plan_reuses_only_the_shards_of_its_own_rows(manifests, tmp_path):
    a, b = manifests
    clean = tmp_path / "clean"
    build_index(b, FakeModel(), clean, BuildOptions(**OPTS))
    out = tmp_path / "reused"
    _partial_run(out / BUILD_DIR, a, keep=2)
    res = build_index(b, FakeModel(), out, BuildOptions(**OPTS))
    assert res.resumed_rows == 0 and res.encoded_rows == 32  # A's shards were dropped, none reused
    for got, want in zip(_vectors(out), _vectors(clean), strict=True):
        np.testing.assert_array_equal(got, want)
    assert list(store.open_index(out).meta["image_id"]) == [f"b-{i}" for i in range(32)]


def test_a_build_without_its_plan_still_reuses_its_own_shards(manifests, tmp_path):
    a, _ = manifests
    out = tmp_path / "own"
    _partial_run(out / BUILD_DIR, a, keep=2)
    res = build_index(a, FakeModel(), out, BuildOptions(**OPTS))
    assert (res.resumed_rows, res.encoded_rows) == (16, 16)


def test_a_shard_of_another_model_or_other_options_is_not_reused(manifests, tmp_path):
    a, _ = manifests
    rows, _ = prepare(a)
    work = tmp_path / "w"
    encode_shards(work, rows, FakeModel(seed=1), batch_size=4, workers=0, shard_rows=8, progress=False)
    binding = shard_bindings(rows, 8, FakeModel().fingerprint, None)[0]
    assert str(load_shard(shard_path(work, 0))["binding"]) != binding
    other = shard_bindings(rows, 8, FakeModel().fingerprint, "bf16")[0]
    assert other != binding


def test_an_add_without_its_plan_reuses_only_the_shards_of_its_own_rows(manifests, tmp_path):
    a, b = manifests
    base_df = read_manifest(a).iloc[:4].assign(image_id=lambda d: [f"base-{i}" for i in range(len(d))])
    base = a.parent / "base.parquet"
    write_manifest(base_df, base)
    clean, out = tmp_path / "clean", tmp_path / "reused"
    for folder in (clean, out):
        build_index(base, FakeModel(), folder, BuildOptions(**OPTS))
    add_to_index(clean, b, FakeModel(), BuildOptions(**OPTS))
    _partial_run(out / ADD_DIR, a, keep=2)
    res = add_to_index(out, b, FakeModel(), BuildOptions(**OPTS))
    assert res.resumed_rows == 0 and res.encoded_rows == 32
    for got, want in zip(_vectors(out), _vectors(clean), strict=True):
        np.testing.assert_array_equal(got, want)
    shutil.rmtree(clean)
