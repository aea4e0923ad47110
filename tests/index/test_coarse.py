"""The IVF coarse quantizer choice (index/coarse.py): the graph over the same centroids answers like the flat one,
survives a save, is kept only where the cost model says it pays and the target recall holds, and the build records
it."""

from __future__ import annotations

import numpy as np
import pytest
from clustered_corpus import clustered_pixels, embed, exact_top, recall_at, stored, write_corpus

from index import coarse, store, tune
from index.build import BuildOptions, build_index
from index.factory import build_from_vectors
from index.recall import exact_neighbours
from index.search import Searcher

TARGET = 0.95


def clustered(n: int, d: int, clusters: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, d)).astype(np.float32)
    x = centres[rng.integers(0, clusters, n)] + 0.2 * rng.standard_normal((n, d)).astype(np.float32)
    return np.ascontiguousarray(x / np.linalg.norm(x, axis=1, keepdims=True), dtype=np.float32)


def choose(index, x: np.ndarray):
    """tune_index with the coarse choice, over the index's own rows (as the build tunes)."""
    ids = tune.sample_ids(len(x), 400)
    truth, scores = exact_neighbours(x[ids], [x], 10, ids)
    return tune.tune_index(index, x[ids], truth, ids, TARGET, scores, pick_coarse=True)


def test_the_graph_holds_the_same_centroids_and_restoring_gives_the_flat_answers_back(tmp_path):
    import faiss

    x = clustered(6000, 32, 60)
    index, _ = build_from_vectors(x, "IVF128,PQ16x4fs,RFlat")
    tune.apply_params(index, {"nprobe": 4, "k_factor": 4})
    q = x[:200]
    _, before = index.search(q, 10)
    centroids = faiss.extract_index_ivf(index).quantizer.reconstruct_n(0, 128)

    restore = coarse.swap(index, coarse.GRAPH)
    assert coarse.kind(index) == "HNSW32"
    graph = faiss.downcast_index(faiss.extract_index_ivf(index).quantizer)
    np.testing.assert_array_equal(graph.reconstruct_n(0, 128), centroids)
    _, via_graph = index.search(q, 10)
    assert recall_at(via_graph, before) > 0.9  # approximate list search, same lists almost always

    path = str(tmp_path / "g.faiss")
    faiss.write_index(index, path)
    loaded = faiss.read_index(path)
    assert coarse.kind(loaded) == "HNSW32"
    tune.apply_params(loaded, {"nprobe": 4, "k_factor": 4})
    np.testing.assert_array_equal(loaded.search(q, 10)[1], via_graph)

    restore()
    assert coarse.kind(index) == "flat"
    np.testing.assert_array_equal(index.search(q, 10)[1], before)


def test_the_cost_model_tries_the_graph_only_where_the_flat_scan_is_the_larger_read():
    x = clustered(3000, 16, 30)
    small, _ = build_from_vectors(x, "IVF64,Flat")
    assert coarse.kind(small) == "flat"
    assert not coarse.graph_pays(small, {"nprobe": 1})  # 64 centroids: 16 * 24 graph steps cost more
    big, _ = build_from_vectors(clustered(2048 * 40, 8, 500), "IVF2048,Flat")
    assert coarse.graph_pays(big, {"nprobe": 2})
    assert not coarse.graph_pays(big, {"nprobe": 128})  # a wide probe: the graph would visit every centroid
    assert coarse.kind(build_from_vectors(x[:100], "Flat")[0]) is None


def test_choose_keeps_the_graph_where_it_pays_and_it_reaches_the_target():
    x = clustered(2048 * 40, 16, 1500, seed=1)
    index, _ = build_from_vectors(x, "IVF2048,PQ8x4fs,RFlat")
    result = choose(index, x)
    assert result.met and result.coarse == coarse.kind(index) == "HNSW32"
    assert {t["coarse"] for t in result.tried} == {"flat", "HNSW32"}  # both were tuned, the log keeps both
    # held-out queries against exact search, at the parameters kept
    q = clustered(300, 16, 1500, seed=1)  # the same centres (same seed), new points around them
    q = q + 0.05 * np.random.default_rng(5).standard_normal(q.shape).astype(np.float32)
    q = np.ascontiguousarray(q / np.linalg.norm(q, axis=1, keepdims=True), dtype=np.float32)
    tune.apply_params(index, result.params)
    assert recall_at(index.search(q, 10)[1], exact_top(x, q, 10)) >= TARGET


def test_choose_leaves_a_small_index_flat_without_a_second_tuning(monkeypatch):
    x = clustered(3000, 16, 30)
    index, _ = build_from_vectors(x, "IVF64,PQ8x4fs,RFlat")
    calls = []
    real = tune.tune
    monkeypatch.setattr(tune, "tune", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    result = choose(index, x)
    assert calls == [1] and result.coarse == coarse.kind(index) == "flat" and result.met


@pytest.fixture()
def cheap_graph(monkeypatch):
    """Make the graph look cheap, so that a small test corpus takes the path a 1M-row build takes."""
    monkeypatch.setattr(coarse, "GRAPH_STEP", 0.01)


def test_the_default_rule_build_records_the_chosen_quantizer_and_queries_reach_the_target(tmp_path, cheap_graph,
                                                                                           monkeypatch):  # fmt: skip
    from index_helpers import FakeModel

    import index.build as build

    monkeypatch.setattr(build, "choose_factory", lambda n, dim, max_memory=None: "IVF32,PQ32x4fs,RFlat")
    rng = np.random.default_rng(0)
    centres = rng.uniform(0.1, 0.9, size=(20, 64))
    corpus = write_corpus(tmp_path / "c", clustered_pixels(2000, centres, seed=1))
    model = FakeModel()
    out = tmp_path / "idx"
    result = build_index(corpus, model, out, BuildOptions(batch_size=256, workers=0, progress=False))
    rec = store.read_info(out)["search"]["images"]
    assert rec["met"] and rec["coarse"] == "HNSW32" == result.search["images"]["coarse"]
    searcher = Searcher(out, model)
    assert coarse.kind(searcher.index.images) == "HNSW32"  # the graph came back from the file
    queries = embed(model, clustered_pixels(300, centres, seed=2), tmp_path / "q")
    _, found = searcher.search_ids(queries, k=10, target="images")
    assert recall_at(found, exact_top(stored(searcher.index.images), queries, 10)) >= TARGET

    # an expert's --factory is kept as given: no quantizer swap
    out2 = tmp_path / "idx2"
    build_index(corpus, model, out2, BuildOptions(factory="IVF32,PQ32x4fs,RFlat", workers=0, progress=False))
    assert store.read_info(out2)["search"]["images"]["coarse"] == "flat"
