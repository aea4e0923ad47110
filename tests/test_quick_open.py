"""A quick open (a generation above FULL_HASH_AT_OPEN, or --mmap) never serves a changed answer: the FAISS files are
hashed in the background and nothing is answered before that hash matched (issue 29, item 3)."""

from __future__ import annotations

import numpy as np
import pytest
from reliability_helpers import unit_vectors, vector_index

from index import store
from index.layout import QUICK_BYTES
from index.search import Searcher
from retrieval.errors import IndexError_


@pytest.fixture(scope="module", params=["Flat", "IVF16,Flat"])
def built(request, tmp_path_factory):
    """3000 x 16 float vectors: 192 KB per FAISS file, more than the quick hash's first and last 64 KiB."""
    out = vector_index(tmp_path_factory.mktemp("q") / "idx", n=3000, d=16, factory=request.param)
    return out, request.param


def _flip_middle(path, bit: int = 0x04) -> bytes:
    data = bytearray(path.read_bytes())
    assert len(data) > 2 * QUICK_BYTES
    pristine = bytes(data)
    data[len(data) // 2] ^= bit
    path.write_bytes(bytes(data))
    return pristine


def test_a_quick_open_answers_only_after_its_background_hash(built, monkeypatch):
    idx, factory = built
    monkeypatch.setattr(store, "FULL_HASH_AT_OPEN", 0)
    queries = unit_vectors(4, 16, seed=7)
    truth = Searcher(store.open_index(idx, full=True)).search_ids(queries, k=5, target="images")
    quick = store.open_index(idx, mmap=factory.startswith("IVF"))
    assert quick.pending is not None  # the quick path was taken
    got = Searcher(quick).search_ids(queries, k=5, target="images")
    np.testing.assert_array_equal(got[1], truth[1])
    quick.close()


@pytest.mark.parametrize("name", [store.IMAGES_FILE, store.REPORTS_FILE])
def test_a_flip_the_quick_checks_miss_stops_the_searcher(built, monkeypatch, name):
    idx, factory = built
    monkeypatch.setattr(store, "FULL_HASH_AT_OPEN", 0)
    path = store.resolve(idx).gen_dir / name
    pristine = _flip_middle(path)
    try:
        opened = store.open_index(idx, mmap=factory.startswith("IVF"))  # the quick checks pass
        searcher = Searcher(opened)
        for _ in range(2):  # and it stays stopped
            with pytest.raises(IndexError_, match=f"{name}: damaged, sha256 mismatch"):
                searcher.search_ids(unit_vectors(2, 16), k=5, target="images")
        opened.close()
    finally:
        path.write_bytes(pristine)
