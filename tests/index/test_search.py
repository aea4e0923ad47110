"""FAISS layer on plain vectors: exact search vs numpy, approximate recall, torch backend, query-time parameters."""

from __future__ import annotations

import faiss
import numpy as np
import pandas as pd
import pytest

from index.backends import FaissBackend, TorchBackend, make_backend, set_search_params
from index.factory import (
    build_from_vectors,
    choose_factory,
    make_index,
    memory_bytes,
    parse_memory,
)
from index.generations import save_index
from index.search import Searcher
from retrieval.errors import UsageError

faiss.omp_set_num_threads(1)  # the test machine is shared; OpenMP spinning on busy cores is pathological


def clustered(n: int, d: int, clusters: int = 100, seed: int = 0, noise: float = 0.35) -> np.ndarray:
    """L2-normalised vectors around `clusters` random centres (the shape real embeddings have)."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(clusters, d)).astype(np.float32)
    x = centres[rng.integers(0, clusters, n)] + noise * rng.normal(size=(n, d)).astype(np.float32)
    return np.ascontiguousarray(x / np.linalg.norm(x, axis=1, keepdims=True), dtype=np.float32)


def brute_force(x: np.ndarray, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Naive reference: all inner products, sorted."""
    sims = q @ x.T
    ids = np.argsort(-sims, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(sims, ids, axis=1), ids


def recall_at(found: np.ndarray, truth: np.ndarray) -> float:
    k = truth.shape[1]
    return float(np.mean([len(set(f[:k]) & set(t)) / k for f, t in zip(found, truth, strict=True)]))


def test_flat_equals_numpy_brute_force():
    x = clustered(3000, 48, seed=1)
    q = clustered(50, 48, seed=2)
    index, factory = build_from_vectors(x)
    assert factory == "Flat"
    scores, ids = FaissBackend(index).search(q, 10)
    ref_scores, ref_ids = brute_force(x, q, 10)
    np.testing.assert_allclose(scores, ref_scores, rtol=1e-5, atol=1e-5)
    # ids agree except where two candidates tie to float precision
    same = ids == ref_ids
    assert same.mean() > 0.99
    assert np.allclose(scores[~same], ref_scores[~same], atol=1e-5)


def test_torch_backend_on_cpu_equals_faiss_flat():
    x = clustered(2000, 64, seed=3)
    q = clustered(40, 64, seed=4)
    index, _ = build_from_vectors(x, "Flat")
    f_scores, f_ids = FaissBackend(index).search(q, 7)
    backend = make_backend(index, "torch", device="cpu")
    assert isinstance(backend, TorchBackend)
    t_scores, t_ids = backend.search(q, 7)
    np.testing.assert_array_equal(t_ids, f_ids)
    np.testing.assert_allclose(t_scores, f_scores, atol=1e-5)
    # bf16 is approximate but keeps the nearest neighbour
    b_scores, b_ids = TorchBackend(x, "cpu", "bf16").search(q, 1)
    assert (b_ids[:, 0] == f_ids[:, 0]).mean() >= 0.9
    np.testing.assert_allclose(b_scores[:, 0], f_scores[:, 0], atol=2e-2)
    # k larger than the corpus pads like faiss does
    s, i = TorchBackend(x[:3], "cpu").search(q[:2], 5)
    assert (i[:, 3:] == -1).all() and np.isneginf(s[:, 3:]).all()


def test_torch_backend_refuses_lossy_index():
    index, _ = build_from_vectors(clustered(2000, 32, seed=5), "IVF16,PQ8")
    with pytest.raises(UsageError, match="Flat or HNSW"):
        make_backend(index, "torch", device="cpu")


def test_auto_backend_is_cpu_faiss_without_gpu():
    index, _ = build_from_vectors(clustered(100, 16))
    assert make_backend(index, "auto").name == "faiss-cpu"


@pytest.mark.parametrize(
    ("factory", "params"),
    [("HNSW32,Flat", {"ef_search": 64}), ("IVF128,Flat", {"nprobe": 16})],
)
def test_approximate_recall_at_10(factory, params):
    """20k clustered vectors, dim 64, 100 clusters: recall@10 against exact search >= 0.95."""
    x = clustered(20000, 64, seed=0)
    q = clustered(20300, 64, seed=0)[20000:]  # same clusters, new points
    _, truth = brute_force(x, q, 10)
    index, _ = build_from_vectors(x, factory)
    set_search_params(index, **params)
    _, found = index.search(q, 10)
    assert recall_at(found, truth) >= 0.95


def test_choose_factory_rule():
    assert choose_factory(10, 256) == "Flat"
    assert choose_factory(49_999, 256) == "Flat"
    assert choose_factory(50_000, 256) == "IVF1024,PQ128x4fs,RFlat"
    assert choose_factory(377_000, 512) == "IVF2048,PQ256x4fs,RFlat"  # MIMIC-CXR's images
    assert choose_factory(1_000_000, 256) == "IVF4096,PQ128x4fs,RFlat"
    assert choose_factory(10_000_000, 512) == "IVF16384,PQ256x4fs,RFlat"
    assert choose_factory(2_000_000, 100) == "IVF4096,PQ50x4fs,RFlat"  # m divides d
    for f in ("Flat", "HNSW32,Flat", "IVF4096,PQ128x4fs,RFlat"):
        assert make_index(f, 256).metric_type == faiss.METRIC_INNER_PRODUCT


def test_the_memory_budget_picks_a_smaller_re_ranked_index():
    n, d = 1_000_000, 512
    assert choose_factory(n, d, 3 * 2**30) == "IVF4096,PQ256x4fs,RFlat"
    assert choose_factory(n, d, int(1.5 * 2**30)) == "IVF4096,PQ256x4fs,Refine(SQfp16)"
    assert choose_factory(n, d, 2**30) == "IVF4096,PQ256x4fs,Refine(SQ8)"
    assert choose_factory(1000, 64, 150_000) == "IVF16,PQ32x4fs,Refine(SQ8)"  # Flat (256 kB) does not fit
    with pytest.raises(UsageError, match="max-memory"):
        choose_factory(n, d, 100 * 2**20)
    assert parse_memory("1.5G") == int(1.5 * 2**30) and parse_memory("512MiB") == 512 * 2**20
    with pytest.raises(UsageError, match="max-memory"):
        parse_memory("lots")


@pytest.mark.parametrize("factory", ["Flat", "HNSW32,Flat", "IVF64,PQ16x4fs,RFlat", "IVF64,PQ16x4fs,Refine(SQ8)"])
def test_memory_estimates_match_the_written_index(factory):
    """The budget rule's estimate against the bytes faiss actually writes (within 15%)."""
    x = clustered(8000, 32, seed=9)
    index, _ = build_from_vectors(x, factory)
    real = len(faiss.serialize_index(index))
    assert abs(memory_bytes(factory, len(x), 32) - real) <= 0.15 * real


def test_bad_factory_is_a_usage_error():
    with pytest.raises(UsageError, match="Bogus"):
        make_index("Bogus12", 64)
    with pytest.raises(UsageError):
        make_index("IVF16,PQ7", 64)  # 7 does not divide 64


def test_search_params_that_do_not_apply_are_refused():
    flat, _ = build_from_vectors(clustered(500, 16))
    with pytest.raises(UsageError, match="IVF"):
        set_search_params(flat, nprobe=4)
    with pytest.raises(UsageError, match="HNSW"):
        set_search_params(flat, ef_search=16)
    hnsw, _ = build_from_vectors(clustered(500, 16), "HNSW16,Flat")
    set_search_params(hnsw, ef_search=77)
    assert faiss.downcast_index(hnsw).hnsw.efSearch == 77
    ivf, _ = build_from_vectors(clustered(2000, 16), "IVF8,Flat")
    set_search_params(ivf, nprobe=5)
    assert faiss.extract_index_ivf(ivf).nprobe == 5
    with pytest.raises(UsageError, match="at least 1"):
        set_search_params(ivf, nprobe=0)


def _vector_index(tmp_path, x: np.ndarray, factory: str = "Flat", studies: int | None = None, sentences=None):
    """An index folder over vectors (reports = images here) with a meta of 2 images per study; study s's report
    is `sentences[s % len(sentences)]` when given, and every 7th row has none."""
    n = len(x)
    study = np.arange(n) // 2 if studies is None else np.arange(n) % studies
    said = [sentences[s % len(sentences)] if sentences else f"report {s}" for s in study]
    meta = pd.DataFrame(
        {
            "row_id": np.arange(n),
            "image_id": [f"i{i}" for i in range(n)],
            "study_id": [f"s{s}" for s in study],
            "patient_id": [f"p{s // 3}" for s in study],
            "image_path": [f"/x/{i}.png" for i in range(n)],
            "view": "PA",
            "report": [r if i % 7 else "" for i, r in enumerate(said)],
            "labels": [["No Finding"]] * n,
            "split": "test",
            "source": "synthetic",
            "has_report": [bool(i % 7) for i in range(n)],
        }
    )
    images, _ = build_from_vectors(x, factory)
    reports, _ = build_from_vectors(x, factory)
    info = {"factory": factory, "model": {"name": "none", "fingerprint": "abc"}}
    return save_index(tmp_path / "idx", images, reports, meta, info), meta


def test_searcher_exclusions_and_study_dedup_match_a_naive_filter(tmp_path):
    x = clustered(400, 24, clusters=5, seed=7)
    path, meta = _vector_index(tmp_path, x)
    searcher = Searcher(path)
    q = clustered(30, 24, clusters=5, seed=8)
    sims = q @ x.T
    for j in range(len(q)):
        patient = meta["patient_id"][int(np.argmax(sims[j]))]
        # naive reference: sort all rows, drop the patient's rows and rows without report, keep 1st row per study
        order = np.argsort(-sims[j], kind="stable")
        want, seen = [], set()
        for i in order:
            if meta["patient_id"][i] == patient or not meta["has_report"][i] or meta["study_id"][i] in seen:
                continue
            seen.add(meta["study_id"][i])
            want.append(meta["study_id"][i])
        got = searcher.query_vector(q[j], k=8, target="reports", exclude_patient=patient)
        assert list(got["study_id"]) == want[:8]
        assert list(got["rank"]) == list(range(1, 9))
        assert (np.diff(got["score"]) <= 1e-6).all()
        # images: no de-duplication, nothing excluded by default
        img = searcher.query_vector(q[j], k=5, target="images")
        assert list(img["row_id"]) == list(np.argsort(-sims[j], kind="stable")[:5])


def test_searcher_widens_until_k_results_survive_the_filter(tmp_path):
    # 600 rows in 3 studies only: report search for k=3 must look far past the first hits to find 3 studies
    x = clustered(600, 16, clusters=3, seed=9)
    path, _ = _vector_index(tmp_path, x, studies=3)
    got = Searcher(path).query_vector(x[0], k=3, target="reports")
    assert sorted(got["study_id"]) == ["s0", "s1", "s2"]
    assert len(Searcher(path).query_vector(x[0], k=10, target="reports")) == 3  # only 3 exist


def test_mmap_for_ivf_and_a_clear_error_otherwise(tmp_path):
    x = clustered(3000, 32, seed=11)
    ivf_path, _ = _vector_index(tmp_path / "a", x, "IVF32,Flat")
    a = Searcher(ivf_path, nprobe=32).query_vector(x[5], k=5, target="images")
    b = Searcher(ivf_path, nprobe=32, mmap=True).query_vector(x[5], k=5, target="images")
    pd.testing.assert_frame_equal(a, b)
    flat_path, _ = _vector_index(tmp_path / "b", x[:100])
    with pytest.raises(UsageError, match="--mmap works for IVF"):
        Searcher(flat_path, mmap=True)


def test_mmap_of_a_re_ranked_index_maps_its_exact_vectors(tmp_path):
    import os

    x = clustered(4000, 64, seed=12)
    path, _ = _vector_index(tmp_path, x, "IVF32,PQ32x4fs,RFlat")
    a = Searcher(path, nprobe=8, k_factor=8)
    b = Searcher(path, nprobe=8, k_factor=8, mmap=True)
    for j in (3, 77, 1500):
        pd.testing.assert_frame_equal(a.query_vector(x[j], k=5), b.query_vector(x[j], k=5))
    # the refine store's codes point into the mapped file instead of a copy on the heap
    refine = faiss.downcast_index(faiss.downcast_index(b.index.images).refine_index)
    assert refine.ntotal == 4000
    size = os.path.getsize(b.index.file("images"))
    heap = faiss.downcast_index(faiss.downcast_index(a.index.images).refine_index).codes.size()
    assert heap == 4000 * 64 * 4 and size > heap
    assert not refine.codes.is_owned and refine.codes.size() == heap  # a view into the mapped file
    assert faiss.downcast_index(faiss.downcast_index(a.index.images).refine_index).codes.is_owned
    b.index.close()


def test_nprobe_on_a_flat_index_is_refused_by_the_searcher(tmp_path):
    path, _ = _vector_index(tmp_path, clustered(100, 8))
    with pytest.raises(UsageError, match="--nprobe applies to IVF"):
        Searcher(path, nprobe=8)
    with pytest.raises(UsageError, match="image and text queries need the model"):
        Searcher(path).query_text("effusion")


def test_search_ids_is_the_same_ranking_without_frames(tmp_path):
    x = clustered(300, 16, clusters=4, seed=12)
    path, _ = _vector_index(tmp_path, x)
    searcher = Searcher(path)
    q = clustered(20, 16, clusters=4, seed=13)
    scores, ids = searcher.search_ids(q, 6, "reports", exclude_patients=["p1"] * 20)
    frames = searcher.search_vectors(q, 6, "reports", exclude_patients=["p1"] * 20)
    for j, (s, i, f) in enumerate(zip(scores, ids, frames, strict=True)):
        assert list(i) == list(f["row_id"])
        np.testing.assert_allclose(s, x[i] @ q[j], atol=1e-5)  # scores are inner products
        np.testing.assert_allclose(s, f["score"], atol=1e-6)
    # fewer qualifying rows than k: padded with -1 / -inf
    s, i = searcher.search_ids(q[:1], 500, "images")
    assert (i[0, 300:] == -1).all() and np.isneginf(s[0, 300:]).all() and sorted(i[0, :300]) == list(range(300))


def test_text_search_keeps_to_reports_with_the_named_finding_like_a_naive_filter(tmp_path):
    """A negated report ("No pleural effusion") may lie nearest in the embedding; a query naming the finding
    returns, by embedding order, only reports the labeler reads as having it (the naive reference: label every
    report, filter, sort all rows), then fills up with the plain ranking; `findings="off"` is the plain ranking."""
    from index.report_findings import query_findings

    x = clustered(300, 16, clusters=4, seed=21)
    sentences = ["No pleural effusion.", "Large right pleural effusion.", "The lungs are clear.", "Small effusion."]
    path, meta = _vector_index(tmp_path, x, sentences=sentences)
    meta_reports = list(meta["report"])
    searcher = Searcher(path)
    text = "large pleural effusion on the right"
    assert query_findings(text) == {"Pleural Effusion"} and query_findings("no pleural effusion") == frozenset()
    q = x[int(np.flatnonzero(np.array(meta_reports) == "No pleural effusion.")[0])]  # nearest: a negated one
    order = np.argsort(-(q @ x.T), kind="stable")
    positive = {"Large right pleural effusion.", "Small effusion."}
    want, seen = [], set()
    for i in order:
        if meta["has_report"][i] and meta_reports[i] in positive and meta["study_id"][i] not in seen:
            seen.add(meta["study_id"][i])
            want.append(meta["study_id"][i])
    got = searcher.text_results(q, text, k=6)
    assert list(got["study_id"]) == want[:6] and list(got["rank"]) == list(range(1, 7))
    plain = searcher.text_results(q, text, k=6, findings="off")
    assert list(plain["study_id"]) == list(searcher.query_vector(q, k=6)["study_id"])
    assert plain["report"].iloc[0] == "No pleural effusion."
    # a finding no report has: the plain ranking, in full
    none = searcher.text_results(q, "pneumothorax", k=6)
    assert list(none["study_id"]) == list(plain["study_id"])
    with pytest.raises(UsageError, match="findings"):
        searcher.text_results(q, text, findings="maybe")
