"""Streaming build and add: vectors equal a naive encode, bad images skipped and listed, resume after SIGKILL."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import faiss
import numpy as np
import pandas as pd
import pytest
import torch
from index_helpers import FakeModel, FakeTransform, make_corpus
from repo_paths import HELPERS, REPO

from index import store
from index.build import BUILD_DIR, BuildOptions, add_to_index, build_index
from index.search import Searcher
from index.shards import plan_sha
from retrieval.data.image_io import read_image
from retrieval.data.manifest import read_manifest, write_manifest
from retrieval.errors import IndexError_, ManifestError

faiss.omp_set_num_threads(1)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    return make_corpus(tmp_path_factory.mktemp("corpus"), n=40)


@pytest.fixture(scope="module")
def built(corpus, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("idx") / "index"
    build_index(corpus, FakeModel(), out, options=BuildOptions(batch_size=4, workers=2, shard_rows=8, progress=False))
    return out


def _naive_vectors(model: FakeModel, paths, texts) -> tuple[np.ndarray, np.ndarray]:
    """Reference: one image at a time, no DataLoader, no shards."""
    t = FakeTransform()
    with torch.no_grad():
        img = [model.project_images(model.image_features(t(read_image(p))[None]))[0].numpy() for p in paths]
    txt = [model.encode_texts([s])[0] for s in texts]
    return np.stack(img), np.stack(txt)


def test_build_matches_a_naive_encode_and_lists_bad_images(built, corpus):
    idx = store.open_index(built, FakeModel())
    manifest = read_manifest(corpus)
    good = manifest[~manifest["image_path"].str.contains("empty|corrupt")].reset_index(drop=True)
    assert idx.count == len(good) == 40
    assert list(idx.meta["image_id"]) == list(good["image_id"])  # manifest order, bad rows dropped
    assert list(idx.meta["row_id"]) == list(range(40))
    paths = [str(Path(manifest.attrs["root"]) / p) for p in good["image_path"]]
    assert list(idx.meta["image_path"]) == paths
    img, txt = _naive_vectors(FakeModel(), paths, list(good["report"]))
    np.testing.assert_allclose(idx.images.reconstruct_n(0, 40), img, atol=1e-6)
    np.testing.assert_allclose(idx.reports.reconstruct_n(0, 40), txt, atol=1e-6)
    assert list(idx.meta["has_report"]) == [bool(r) for r in good["report"]]
    bad = store.read_bad(built)
    assert sorted(Path(p).name for p in bad["path"]) == ["corrupt.png", "empty.png"]
    assert all(bad["reason"].str.len() > 0)
    assert "empty" in bad.loc[bad["path"].str.endswith("empty.png"), "reason"].item()
    assert idx.info["bad_images"] == 2 and idx.info["factory"] == "Flat"
    assert idx.info["model"]["fingerprint"] == FakeModel().fingerprint
    assert not (built / BUILD_DIR).exists()


def test_an_indexed_image_finds_itself(built, corpus):
    searcher = Searcher(built, FakeModel())
    path = Path(read_manifest(corpus).attrs["root"]) / "images" / "im0013.png"
    hits = searcher.query_image(path, k=3, target="images")
    assert hits["image_id"].iloc[0] == "img0013"
    assert hits["score"].iloc[0] == pytest.approx(1.0, abs=1e-5)


def test_existing_index_and_other_inputs_are_refused(built, corpus, tmp_path):
    again = build_index(
        corpus, FakeModel(), built, options=BuildOptions(progress=False)
    )  # the same build, already committed
    assert again.already_done and again.count == 40 and again.encoded_rows == 0
    other = tmp_path / "other.parquet"
    write_manifest(read_manifest(corpus).iloc[:10].assign(image_path=lambda d: [
        str(Path(read_manifest(corpus).attrs["root"]) / p) for p in d["image_path"]]), other)  # fmt: skip
    with pytest.raises(IndexError_, match="already holds an index"):
        build_index(other, FakeModel(), built, options=BuildOptions(progress=False, allow_outside=True))
    out = tmp_path / "i"
    (out / BUILD_DIR).mkdir(parents=True)
    plan = {"kind": "build", "manifest_digest": "other"}
    (out / BUILD_DIR / "plan.json").write_text(json.dumps({"plan": plan, "sha256": plan_sha(plan)}))
    with pytest.raises(IndexError_, match="different manifest_digest"):
        build_index(corpus, FakeModel(), out, options=BuildOptions(workers=0, progress=False))
    (out / BUILD_DIR / "plan.json").write_text('{"kind": "build", "manifest_digest": "other"}')  # no checksum
    with pytest.raises(IndexError_, match="plan.json: damaged build plan"):
        build_index(corpus, FakeModel(), out, options=BuildOptions(workers=0, progress=False))


def test_a_second_writer_is_refused_while_another_process_holds_the_folder(corpus, tmp_path):
    out = tmp_path / "busy"
    holder = "import sys, time; sys.path.insert(0, {repo!r}); from pathlib import Path; from index.generations "
    holder += "import writer_lock\nwith writer_lock(Path({out!r})):\n    print('locked', flush=True); time.sleep(60)"
    proc = subprocess.Popen(
        [sys.executable, "-c", holder.format(repo=str(REPO), out=str(out))], stdout=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout.readline().strip() == "locked"
        with pytest.raises(IndexError_, match="another `cxr index build/add` is writing"):
            build_index(corpus, FakeModel(), out, options=BuildOptions(workers=0, progress=False))
    finally:
        proc.kill()  # a killed holder releases the lock
        proc.wait()
    build_index(corpus, FakeModel(), out, options=BuildOptions(workers=0, progress=False))
    assert store.open_index(out).count == 40


def test_add_appends_and_equals_a_single_build(corpus, built, tmp_path):
    manifest = read_manifest(corpus)
    first, second = tmp_path / "a.parquet", tmp_path / "b.parquet"
    write_manifest(manifest.iloc[:20], first)
    write_manifest(manifest.iloc[20:], second)
    for p in (first, second):  # the images live beside the original manifest
        df = read_manifest(p)
        df["image_path"] = [str(Path(manifest.attrs["root"]) / x) for x in df["image_path"]]
        write_manifest(df, p)
    out = tmp_path / "idx"
    with pytest.raises(ManifestError, match="outside the manifest folder"):  # absolute paths elsewhere: explicit
        build_index(first, FakeModel(), out, options=BuildOptions(workers=0, shard_rows=8, progress=False))
    build_index(
        first, FakeModel(), out, options=BuildOptions(workers=0, shard_rows=8, progress=False, allow_outside=True)
    )
    with pytest.raises(IndexError_, match="fingerprint"):
        add_to_index(
            out, second, FakeModel(seed=1), options=BuildOptions(workers=0, progress=False, allow_outside=True)
        )
    res = add_to_index(
        out, second, FakeModel(), options=BuildOptions(workers=0, shard_rows=8, progress=False, allow_outside=True)
    )
    assert (res.added, res.count, len(res.bad)) == (22, 40, 0)  # rows 20..41; both bad images were in `first`
    whole, part = store.open_index(built), store.open_index(out)
    assert part.count == whole.count == 40
    np.testing.assert_allclose(part.images.reconstruct_n(0, 40), whole.images.reconstruct_n(0, 40), atol=1e-6)
    np.testing.assert_allclose(part.reports.reconstruct_n(0, 40), whole.reports.reconstruct_n(0, 40), atol=1e-6)
    pd.testing.assert_frame_equal(part.meta, whole.meta)
    assert len(store.read_bad(out)) == 2 and len(part.info["manifests"]) == 2
    again = add_to_index(out, second, FakeModel(), options=BuildOptions(workers=0, progress=False, allow_outside=True))
    assert again.already_done and again.count == 40  # the same add, already committed: nothing to do
    third = tmp_path / "c.parquet"
    write_manifest(read_manifest(second).iloc[:3], third)
    with pytest.raises(IndexError_, match="already in the index"):
        add_to_index(out, third, FakeModel(), options=BuildOptions(workers=0, progress=False, allow_outside=True))


def test_build_with_an_hnsw_factory(corpus, tmp_path):
    out = tmp_path / "h"
    res = build_index(corpus, FakeModel(), out, options=BuildOptions(factory="HNSW16,Flat", workers=0, progress=False))
    idx = store.open_index(out)
    assert res.factory == idx.info["factory"] == "HNSW16,Flat"
    assert isinstance(faiss.downcast_index(idx.images), faiss.IndexHNSWFlat)


KILLED_BUILD = textwrap.dedent(
    """
    import sys
    sys.path[:0] = [{tests!r}, {repo!r}]
    from index_helpers import FakeModel
    from index.build import BuildOptions, build_index
    build_index({manifest!r}, FakeModel(), {out!r}, BuildOptions(batch_size=4, workers=2, shard_rows=8, progress=False))
    """
)


@pytest.mark.slow
def test_resume_after_sigkill_equals_an_uninterrupted_build(corpus, built, tmp_path):
    out = tmp_path / "killed"
    script = KILLED_BUILD.format(tests=str(HELPERS), repo=str(REPO), manifest=str(corpus), out=str(out))
    env = dict(os.environ, CXR_FAKE_DELAY="0.15", OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, "-c", script], env=env, start_new_session=True)
    work = out / BUILD_DIR
    deadline = time.time() + 60
    while len(list(work.glob("shard-*.npz"))) < 2 and time.time() < deadline and proc.poll() is None:
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)  # the builder and its DataLoader workers, mid-way
    proc.wait()
    done = len(list(work.glob("shard-*.npz")))
    assert 2 <= done < 6, f"kill came too late or too early ({done} of 6 shards)"
    assert not (out / store.INFO_FILE).exists()
    (work / ".shard-000005.npz.abc.tmp").write_bytes(b"half a shard")  # what a kill mid-write leaves

    res = build_index(
        corpus, FakeModel(), out, options=BuildOptions(batch_size=4, workers=0, shard_rows=8, progress=False)
    )
    assert res.resumed_rows == done * 8 and res.encoded_rows == 42 - done * 8
    a, b = store.open_index(out), store.open_index(built)
    assert a.count == b.count == 40
    np.testing.assert_array_equal(a.images.reconstruct_n(0, 40), b.images.reconstruct_n(0, 40))
    np.testing.assert_array_equal(a.reports.reconstruct_n(0, 40), b.reports.reconstruct_n(0, 40))
    pd.testing.assert_frame_equal(a.meta, b.meta)
    pd.testing.assert_frame_equal(store.read_bad(out), store.read_bad(built))
    assert not work.exists()
