"""What an index build, an add and a batch query need from the one image path (`retrieval.models.image_stream`):
image vectors per batch of manifest rows, with unreadable images reported as (row id, reason) and skipped.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence

import numpy as np

from retrieval.models.image_stream import stream_images
from retrieval.models.protocols import EmbeddingModel

BadRows = list[tuple[int, str]]


def stream_image_vectors(
    paths: Sequence[str],
    model: EmbeddingModel,
    batches: Iterable[list[int]],
    workers: int = 2,
    precision: str | None = None,
) -> Iterator[tuple[np.ndarray, np.ndarray, BadRows]]:
    """Yield (row ids, vectors, bad rows) per batch of row indices into `paths`, in the order of `batches`."""
    for b in stream_images(
        model,
        list(paths),
        output="embeddings",
        batches=batches,
        num_workers=workers,
        precision=precision or "auto",
        on_error="skip",
    ):
        yield b.positions, b.values, b.bad
