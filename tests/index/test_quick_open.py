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


def test_a_gc_waits_for_the_background_hash(tmp_path, monkeypatch):
    """A quick (non-mmap) open keeps its generation's read lock until the hash has read every file: a writer's gc
    never removes the files under it (which would stop a healthy searcher)."""
    import threading

    from index import generations, layout

    idx = vector_index(tmp_path / "idx", n=3000, d=16)
    monkeypatch.setattr(store, "FULL_HASH_AT_OPEN", 0)
    release, real = threading.Event(), layout.sha256_file

    def slow_in_background(path):
        if threading.current_thread().name == "cxr-index-verify":
            release.wait(30)
        return real(path)

    monkeypatch.setattr(layout, "sha256_file", slow_in_background)
    opened = store.open_index(idx)
    old = opened.gen_dir
    vector_index(idx, n=3000, d=16, seed=5)  # a newer generation is committed meanwhile
    assert old.is_dir() and old.name in generations.gc_index(idx)["kept"]
    release.set()
    Searcher(opened).search_ids(unit_vectors(1, 16), k=3, target="images")  # the hash ends and matches
    assert old.name in generations.gc_index(idx)["removed"] and not old.exists()
