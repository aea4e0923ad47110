"""One FAISS index from shards the way autofaiss builds distributed: train once on a sample, fill one copy of the
trained empty index per shard (each on its own worker), then merge the parts in shard order.

    trained = make_index(factory, d); train_index(trained, sample)      # once, on the driver
    part_s  = copy of trained + add(shard s's vectors)                  # anywhere, in parallel
    index   = part_0 <- merge part_1 <- merge part_2 ...                 # shard order = row order

The merged index equals the one the single-process build makes by adding the shards one after another: the same
coarse centroids and codebooks encode each vector the same way, an inverted list keeps its entries in row order,
and a part's ids are shifted by the rows before it. So ids, stored vectors and search results are the same
(tests/test_index_shards.py). Mergeable: Flat, SQ/PQ codes, any IVF (Flat, SQ, PQ, fast-scan PQ, HNSW coarse
quantiser), a refine step over any of them, a pre-transform (OPQ, PCA) over any of them. An HNSW graph cannot be
merged (faiss has no merge for it): `fill_by_merge` adds its shards one after another instead.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

import numpy as np

log = logging.getLogger(__name__)


def mergeable(index: Any) -> bool:
    """True when faiss can append one filled copy of `index` to another (see the module docstring)."""
    import faiss

    idx = faiss.downcast_index(index)
    if isinstance(idx, faiss.IndexRefine):
        return mergeable(idx.base_index) and mergeable(idx.refine_index)
    if isinstance(idx, faiss.IndexPreTransform):
        return mergeable(idx.index)
    return isinstance(idx, faiss.IndexIVF | faiss.IndexFlatCodes)


def merge_into(dst: Any, src: Any) -> None:
    """Append every vector of `src` (a filled copy of the same trained index) to `dst`; src's row i becomes
    dst's row dst.ntotal + i. `src` is emptied (faiss moves inverted-list entries)."""
    import faiss

    a, b = faiss.downcast_index(dst), faiss.downcast_index(src)
    if isinstance(a, faiss.IndexRefine):
        merge_into(a.base_index, b.base_index)
        merge_into(a.refine_index, b.refine_index)
        a.ntotal = a.base_index.ntotal
    elif isinstance(a, faiss.IndexPreTransform):
        merge_into(a.index, b.index)
        a.ntotal = a.index.ntotal
    elif isinstance(a, faiss.IndexIVF):
        a.merge_from(b, a.ntotal)  # IVF stores ids: shift src's by the rows before it
    elif isinstance(a, faiss.IndexFlatCodes):
        a.merge_from(b, 0)  # ids are positions: appending is the shift
    else:
        raise TypeError(f"faiss cannot merge {type(a).__name__} indexes")


def fill_part(trained: Any, vectors: np.ndarray) -> Any:
    """A copy of the trained empty index holding `vectors` (one shard's part)."""
    import faiss

    part = faiss.clone_index(trained)
    part.add(np.ascontiguousarray(vectors, dtype=np.float32))
    return part


def merge_parts(parts: Iterable[Any]) -> Any:
    """One index from the filled parts, in the order given (that of their rows)."""
    out = None
    for part in parts:
        if out is None:
            out = part
        else:
            merge_into(out, part)
    if out is None:
        raise ValueError("no parts to merge")
    return out


def fill_by_merge(trained: Any, chunks: Iterable[np.ndarray]) -> Any:
    """`trained` (not modified) filled with the chunks, in this process, by per-chunk parts merged in order; an
    index that cannot be merged (HNSW) gets the chunks added one after another to a copy."""
    import faiss

    if not mergeable(trained):
        log.info("%s cannot be merged: adding the shards one after another", type(trained).__name__)
        out = faiss.clone_index(trained)
        for chunk in chunks:
            if len(chunk):
                out.add(np.ascontiguousarray(chunk, dtype=np.float32))
        return out
    parts = (fill_part(trained, c) for c in chunks if len(c))
    try:
        return merge_parts(parts)
    except ValueError:  # no vectors at all
        return faiss.clone_index(trained)


def to_bytes(index: Any) -> np.ndarray:
    """An index as a uint8 array (what crosses process boundaries: Ray's object store)."""
    import faiss

    return faiss.serialize_index(index)


def from_bytes(data: np.ndarray) -> Any:
    import faiss

    return faiss.deserialize_index(np.asarray(data, dtype=np.uint8))
