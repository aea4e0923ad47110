"""Building from shards the distributed way (index/merge.py): train once, fill one part per shard, merge in
order. The merged index must equal the single-process one (the shards added to the trained index one after
another, as index/build.py fills it): same ids, same stored vectors, same search results."""

from __future__ import annotations

import faiss
import numpy as np
import pytest

from index import merge
from index.factory import add_chunks, make_index, train_index

faiss.omp_set_num_threads(1)
DIM = 32


def _vectors(n: int, seed: int = 0) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((n, DIM)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _trained(factory: str, sample: np.ndarray):
    index = make_index(factory, DIM)
    train_index(index, sample, factory)
    return index


def _params(index) -> None:
    ps = faiss.ParameterSpace()
    if "IVF" in str(type(faiss.downcast_index(index))) or faiss.try_extract_index_ivf(index) is not None:
        ps.set_index_parameter(index, "nprobe", 4)
    if isinstance(faiss.downcast_index(index), faiss.IndexRefine):
        ps.set_index_parameter(index, "k_factor_rf", 4)
    if isinstance(faiss.downcast_index(index), faiss.IndexHNSW):
        ps.set_index_parameter(index, "efSearch", 32)


def _assert_same(single, merged, queries: np.ndarray) -> None:
    assert merged.ntotal == single.ntotal
    for ix in (single, merged):
        _params(ix)
    ds, is_ = single.search(queries, 10)
    dm, im = merged.search(queries, 10)
    np.testing.assert_array_equal(im, is_)
    np.testing.assert_allclose(dm, ds, atol=1e-5)
    stored_s, stored_m = shards_vectors(single), shards_vectors(merged)
    if stored_s is not None:
        np.testing.assert_allclose(stored_m, stored_s, atol=1e-5)


def shards_vectors(index):
    """The exact vectors a refine step or a Flat index holds, in row order (None for others)."""
    idx = faiss.downcast_index(index)
    if isinstance(idx, faiss.IndexRefine):
        idx = faiss.downcast_index(idx.refine_index)
    return idx.reconstruct_n(0, idx.ntotal) if isinstance(idx, faiss.IndexFlat) else None


@pytest.mark.parametrize(
    "factory",
    ["Flat", "IVF16,PQ16x4fs,RFlat", "IVF16,PQ16x4fs,Refine(SQ8)", "IVF16_HNSW32,PQ16x4fs,RFlat", "IVF16,Flat",
     "OPQ8,IVF16,PQ8", "HNSW16,Flat"],
)  # fmt: skip
def test_the_merged_index_equals_the_single_process_index(factory):
    """Uneven shards (one empty) filled as separate parts and merged, against the same shards added one after
    another (HNSW, which cannot merge, is filled that way too)."""
    x = _vectors(3000)
    trained = _trained(factory, x[:2000])
    cuts = [0, 700, 700, 1900, 2333, 3000]  # shard 1 is empty
    chunks = [x[a:b] for a, b in zip(cuts, cuts[1:], strict=False)]
    single = faiss.clone_index(trained)
    add_chunks(single, chunks)
    merged = merge.fill_by_merge(trained, chunks)
    assert trained.ntotal == 0  # the trained template is left empty for the next target
    _assert_same(single, merged, _vectors(64, seed=1))
    assert merge.mergeable(trained) == (not factory.startswith("HNSW"))


def test_ids_of_later_parts_are_shifted_by_the_rows_before_them():
    """Each part's own vectors, searched in the merged IVF, come back under their global row ids."""
    x = _vectors(2000)
    trained = _trained("IVF16,Flat", x)
    merged = merge.fill_by_merge(trained, [x[:500], x[500:1200], x[1200:]])
    faiss.ParameterSpace().set_index_parameter(merged, "nprobe", 16)  # exhaustive: each row finds itself
    _, ids = merged.search(x[[0, 499, 500, 1199, 1200, 1999]], 1)
    assert ids[:, 0].tolist() == [0, 499, 500, 1199, 1200, 1999]


def test_a_part_survives_serialisation_and_an_unmergeable_index_is_refused():
    x = _vectors(1000)
    trained = _trained("IVF8,PQ16x4fs,RFlat", x)
    shipped = merge.from_bytes(merge.to_bytes(trained))  # what a Ray task receives and sends back
    parts = [merge.from_bytes(merge.to_bytes(merge.fill_part(shipped, c))) for c in (x[:400], x[400:])]
    merged = merge.merge_parts(parts)
    single = faiss.clone_index(trained)
    single.add(x)
    _assert_same(single, merged, x[:32])
    with pytest.raises(TypeError, match="cannot merge"):
        merge.merge_into(faiss.IndexHNSWFlat(DIM, 16), faiss.IndexHNSWFlat(DIM, 16))
    with pytest.raises(ValueError, match="no parts"):
        merge.merge_parts([])
