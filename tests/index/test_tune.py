"""Build-time tuning: the stored efSearch / nprobe / k_factor reach the target recall at query time with no flags,
against exact search on held-out queries; old indexes without the record still open."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import faiss
import numpy as np
import pandas as pd
import pytest
from clustered_corpus import clustered_pixels, embed, exact_top, recall_at, stored, write_corpus
from index_helpers import FakeModel, _row

from index import generations, layout, store, tune
from index.build import BuildOptions, add_to_index, build_index
from index.factory import build_from_vectors
from index.search import Searcher
from retrieval.data.manifest import write_manifest
from retrieval.errors import IndexError_

faiss.omp_set_num_threads(1)
TARGET = 0.95


@pytest.fixture(scope="module")
def centres() -> np.ndarray:
    return np.random.default_rng(0).uniform(0.1, 0.9, size=(20, 64))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, centres) -> Path:
    return write_corpus(tmp_path_factory.mktemp("tune"), clustered_pixels(3000, centres, seed=1))


@pytest.mark.parametrize("factory, knob", [("IVF64,Flat", "nprobe"), ("HNSW4,Flat", "efSearch")])
def test_a_built_index_reaches_the_target_with_no_flags(corpus, centres, tmp_path, factory, knob):
    model = FakeModel()
    out = tmp_path / "idx"
    opts = BuildOptions(factory=factory, batch_size=256, workers=0, shard_rows=700, progress=False)
    result = build_index(corpus, model, out, options=opts)
    info = store.read_info(out)
    rec = info["search"]["images"]
    assert rec["met"] and rec["target"] == TARGET and rec["queries"] == 1000 and rec["k"] == 10
    assert set(rec["params"]) == {knob}
    assert result.search["images"] == rec

    # held-out queries from the same clusters, exact top 10 over the index's own vectors as the truth
    queries = embed(model, clustered_pixels(400, centres, seed=2), tmp_path / "queries")
    searcher = Searcher(out, model)  # no parameters given: the tuned ones apply
    assert searcher.search_params["images"] == rec["params"]
    idx = searcher.index.images
    truth = exact_top(stored(idx), queries, 10)
    _, found = searcher.search_ids(queries, k=10, target="images")
    assert recall_at(found, truth) >= TARGET

    # tuning mattered: faiss's defaults (nprobe 1 / efSearch 16) miss the target on the same queries
    default = store.open_index(out).images
    tune.apply_params(default, {knob: {"nprobe": 1, "efSearch": 16}[knob]})
    _, plain = default.search(queries, 10)
    assert recall_at(plain, truth) < TARGET
    # and it picked the cheapest value on its ladder: one step lower misses the target on its own sample
    # (mean recall less one standard error, the passing rule)
    ladder = tune._ladder(idx, knob)
    lower = ladder[ladder.index(rec["params"][knob]) - 1]
    sample = tune.sample_ids(idx.ntotal)
    vecs = stored(idx)
    q, qids, t, ts, how = tune.tuning_queries(idx, vecs[sample], sample, lambda: [vecs], 10)
    assert how == rec["sample"] == (tune.NOISY if knob == "efSearch" else tune.SELF)
    per = tune.measure(idx, q, qids, t, {knob: lower}, ts, per_query=True)
    assert per.mean() - per.std(ddof=1) / np.sqrt(len(per)) < TARGET  # the bound a setting must reach


def test_overrides_win_over_the_tuned_parameters(corpus, tmp_path):
    out = tmp_path / "idx"
    build_index(corpus, FakeModel(), out, options=BuildOptions(factory="IVF64,Flat", workers=0, progress=False))
    s = Searcher(out, FakeModel(), nprobe=64)
    assert s.search_params["images"] == {"nprobe": 64}
    assert faiss.extract_index_ivf(s.index.images).nprobe == 64


def test_re_ranked_pq_tunes_nprobe_and_k_factor_against_exact_search():
    rng = np.random.default_rng(3)
    centres = rng.normal(size=(80, 32))
    x = centres[rng.integers(0, 80, 6000)] + 0.45 * rng.normal(size=(6000, 32))
    x = np.ascontiguousarray(x / np.linalg.norm(x, axis=1, keepdims=True), dtype=np.float32)
    held = x[:300].copy()
    base = x[300:]
    index, _ = build_from_vectors(base, "IVF64,PQ8x4fs,RFlat")
    t = tune.tune_on_vectors(index, base, TARGET, n_queries=500)
    assert t.met and set(t.params) == {"nprobe", "k_factor"} and t.params["k_factor"] > 1
    truth = exact_top(base, held, 10)
    _, found = index.search(held, 10)  # tune_on_vectors left the chosen parameters set
    assert recall_at(found, truth) >= TARGET
    tune.apply_params(index, {"nprobe": t.params["nprobe"], "k_factor": 1})  # the PQ codes alone
    _, unranked = index.search(held, 10)
    assert recall_at(unranked, truth) < TARGET


def test_an_index_below_the_target_warns_and_records_it(corpus, tmp_path, caplog):
    out = tmp_path / "idx"
    with caplog.at_level(logging.WARNING):
        build_index(corpus, FakeModel(), out, options=BuildOptions(factory="IVF16,PQ2", workers=0, progress=False))
    rec = store.read_info(out)["search"]["images"]
    assert not rec["met"] and rec["recall"] < TARGET
    assert "below" in caplog.text or "reaches only" in caplog.text


def test_a_flat_index_records_exact_search(corpus, tmp_path):
    out = tmp_path / "idx"
    build_index(corpus, FakeModel(), out, options=BuildOptions(workers=0, progress=False))
    info = store.read_info(out)
    assert info["factory"] == "Flat"
    assert info["search"]["images"] == {
        "params": {}, "recall": 1.0, "target": TARGET, "k": 10, "queries": 0, "met": True, "method": "exact",
        "sample": "",
    }  # fmt: skip


def test_add_tunes_again(corpus, centres, tmp_path):
    out = tmp_path / "idx"
    first = corpus.parent / "manifest.parquet"
    df = pd.read_parquet(first)
    part = tmp_path / "part"
    part.mkdir()
    (part / "images").symlink_to(corpus.parent / "images")  # a link out of the folder: allowed by name below
    write_manifest(df.iloc[:2000], part / "a.parquet")
    write_manifest(df.iloc[2000:], part / "b.parquet")
    opts = BuildOptions(factory="HNSW4,Flat", workers=0, progress=False, allow_outside=True)
    build_index(part / "a.parquet", FakeModel(), out, options=opts)
    add_to_index(out, part / "b.parquet", FakeModel(), options=opts)
    info = store.read_info(out)
    assert info["count"] == 3000 and info["search"]["images"]["met"]
    assert info["search"]["images"]["queries"] == 1000


def _old_style(tmp_path: Path) -> Path:
    x = np.random.default_rng(0).normal(size=(300, 16)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    images, _ = build_from_vectors(x, "HNSW8,Flat")
    reports, _ = build_from_vectors(x, "HNSW8,Flat")
    meta = pd.DataFrame([_row(i, f"im{i}.png") for i in range(300)])
    meta.insert(0, "row_id", np.arange(300))
    meta["has_report"] = True
    info = {"factory": "HNSW8,Flat", "model": {"name": "fake", "fingerprint": "f"}}
    return generations.save_index(tmp_path / "old", images, reports, meta[layout.META_COLUMNS], info)


def test_an_index_without_a_search_record_still_opens_with_faiss_defaults(tmp_path, capsys):
    from cli.main import main

    out = _old_style(tmp_path)
    assert "search" not in store.read_info(out)
    assert main(["index", "info", str(out)]) == 0
    assert "not tuned" in capsys.readouterr().out
    s = Searcher(out)
    assert s.search_params == {"images": {}, "reports": {}}
    assert faiss.downcast_index(s.index.images).hnsw.efSearch == 16
    assert len(s.query_vector(s.index.images.reconstruct(0), k=3, target="images")) == 3


def test_a_damaged_search_record_is_refused_by_name(tmp_path):
    out = _old_style(tmp_path)
    gen = store.resolve(out).gen_dir
    info = json.loads((gen / store.INFO_FILE).read_text())
    bad = {"images": {"params": {"efSearch": "64"}, "recall": 0.97, "target": 0.95}}
    with pytest.raises(IndexError_, match=r"search\.images\.params\.efSearch"):
        layout.validate_info({**info, "search": bad}, gen / store.INFO_FILE)
    unknown = {"images": {"params": {"nprobes": 4}, "recall": 0.97, "target": 0.95}}
    with pytest.raises(IndexError_, match="nprobes"):
        layout.validate_info({**info, "search": unknown}, gen / store.INFO_FILE)
