"""One image query as `cxr query IMAGE` answers it, fast on the CPU: `image_query(index, pixels, k)`.

When the index's model was exported to ONNX (`retrieval.models.onnx_embedder`, keyed by the fingerprint the index
records), ONNX Runtime embeds the image and neither torch nor open_clip is imported; otherwise the recorded model
loads, answers, and is exported for the next query.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from index.search import Searcher
from index.store import CXRIndex


def image_query(
    index: CXRIndex,
    pixels: np.ndarray,
    k: int = 5,
    target: str = "reports",
    *,
    model: str | None = None,
    device: str | None = "auto",
    backend: str = "auto",
    exclude_patient: str | None = None,
    **params: Any,
) -> tuple[pd.DataFrame, dict | None]:
    """One image query as `cxr query IMAGE` answers it (`params`: nprobe, ef_search, k_factor, mmap,
    one_per_patient): the hits and `Searcher.match` of the query vector (None without a calibrated threshold).

    On the CPU, when the index's model was exported (`retrieval.models.onnx_embedder`, keyed by the fingerprint
    the index records), ONNX Runtime embeds the image and neither torch nor open_clip is imported. Otherwise (a
    GPU, a `model` named, no export yet) the recorded model loads and answers, and on the CPU it is exported then,
    so the next query takes the fast path."""
    from retrieval.models import onnx_embedder

    cpu = onnx_embedder.cpu_only(device) and backend in ("auto", "faiss")
    fingerprint = index.info.get("model", {}).get("fingerprint")
    embedder = onnx_embedder.open_embedder(fingerprint) if cpu and model is None else None
    if embedder is not None:
        searcher = Searcher(index, None, backend=backend, device="cpu", **params)
        vector = embedder.encode(pixels)
        hits = searcher.query_vector(vector, k, target, exclude_patient)
        return hits, searcher.match(vector, "image", exclude_patient)
    from index.store import load_recorded_model

    loaded = load_recorded_model(index.info, index.path, model, device)
    searcher = Searcher(index, loaded, backend=backend, device=device, **params)
    vector = searcher.image_vector(pixels)
    hits = searcher.query_vector(vector, k, target, exclude_patient)
    if cpu:  # the Searcher checked that the model's fingerprint is the index's
        onnx_embedder.export_embedder(loaded, fingerprint)
    return hits, searcher.match(vector, "image", exclude_patient)
