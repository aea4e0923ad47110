"""What the VLM reads besides text, computed once per image: frozen visual tokens and retrieved exemplars.

Visual tokens for many manifest rows are computed in batches (bad images skipped and reported, never fatal) and,
with a `cache_dir`, kept on disk once per corpus: one safetensors file per (frozen encoder weights, grid), keyed
per image by path, size and mtime, so later training runs, ablations and evaluations never re-run a tower.
Exemplars come from an index folder (`index.search.Searcher`): the query vector of a row is the index's stored
image vector when the row's image is in the index (no model needed), else the retrieval model embeds it.
"""

from __future__ import annotations

import logging
from collections.abc import Collection, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from generation.data.rag import Exemplar, retrieve_exemplars
from generation.model.encoders import combine_tokens, encode_visual

log = logging.getLogger(__name__)


def row_image_path(df: pd.DataFrame, pos: int) -> Path:
    """The resolved image path of the manifest row at position `pos`."""
    from retrieval.data.manifest import resolve_image_path

    return resolve_image_path(df.attrs.get("root"), df.iloc[pos]["image_path"])


def encoder_key(enc: Any) -> str:
    """A hash of what an encoder's tokens depend on: its image tower's weights (a retrieval model's projector
    heads do not change its tokens, so a trained model and its untrained config share a cache)."""
    from retrieval.models.saved_model import fingerprint_state

    module = enc.towers()["image"] if hasattr(enc, "towers") else enc
    return fingerprint_state(module.state_dict())


def _cached_tokens(
    enc: Any, paths: list[str], grid: int | None, batch_size: int, progress: bool, cache_dir: Path
) -> tuple[dict[int, torch.Tensor], dict[int, str]]:
    """One encoder's tokens for `paths` ({position: (N, D) fp16}), read from / appended to its cache file."""
    from retrieval.models.token_cache import TokenCache

    cache = TokenCache(cache_dir, encoder_key(enc), grid)
    out = cache.get(paths)
    missing = [j for j in range(len(paths)) if j not in out]
    bad: dict[int, str] = {}
    if missing:
        desc = "visual tokens" if progress else None
        toks, kept, bad_m = encode_visual([enc], [paths[j] for j in missing], grid, batch_size, "skip", desc)
        bad = {missing[j]: reason for j, reason in bad_m}
        if len(kept):
            cache.add([paths[missing[j]] for j in kept.tolist()], toks)
            out.update({missing[j]: toks[n].to(torch.float16) for n, j in enumerate(kept.tolist())})
        log.info("visual tokens: %d computed, %d from %s", len(missing), len(paths) - len(missing), cache.file)
    return out, bad


def visual_tokens_for_rows(
    df: pd.DataFrame,
    rows: Sequence[int],
    encoders: Sequence[Any],
    grid: int | None,
    batch_size: int = 32,
    progress: bool = True,
    cache_dir: str | Path | None = None,
) -> tuple[dict[int, torch.Tensor], list[dict]]:
    """{row position: (N, D) float16 visual tokens} and the bad rows ({row, image_id, path, reason}).

    With `cache_dir`, each frozen encoder's tokens are read from (and missing ones added to) its cache file."""
    rows = list(rows)
    paths = [str(row_image_path(df, pos)) for pos in rows]
    if cache_dir is None:
        desc = "visual tokens" if progress else None
        toks, kept, bad = encode_visual(encoders, paths, grid, batch_size, on_error="skip", progress=desc)
        out = {int(rows[j]): toks[n].to(torch.float16) for n, j in enumerate(kept.tolist())}
    else:
        per_enc = [_cached_tokens(e, paths, grid, batch_size, progress, Path(cache_dir)) for e in encoders]
        bad_d: dict[int, str] = {}
        for _, b in per_enc:
            bad_d.update(b)
        ok = [j for j in range(len(rows)) if all(j in t for t, _ in per_enc)]
        if len(per_enc) == 1:  # one encoder: its cached fp16 tokens as they are
            out = {int(rows[j]): per_enc[0][0][j] for j in ok}
        else:
            out = {}
            for j in ok:
                out[int(rows[j])] = combine_tokens([t[j][None].float() for t, _ in per_enc])[0].to(torch.float16)
        bad = sorted(bad_d.items())
    bad_rows = [
        {"row": int(rows[j]), "image_id": str(df.iloc[rows[j]]["image_id"]), "path": paths[j], "reason": reason}
        for j, reason in bad
    ]
    return out, bad_rows


def open_searcher(index_dir: str | Path, model: Any = None):
    """A Searcher over `index_dir` (with `model` when given, checked against the index's fingerprint)."""
    from index.search import Searcher

    return Searcher(index_dir, model=model)


def query_vectors(df: pd.DataFrame, rows: Sequence[int], searcher: Any, model: Any = None) -> np.ndarray:
    """Image vectors of `rows`: the index's stored vector when the image_id is indexed, else embedded by
    `model` (a model, a zero-argument loader, or None for the model the index records)."""
    from index.backends import exact_vectors

    meta = searcher.index.meta
    where = {str(i): r for r, i in enumerate(meta["image_id"].astype(str))}
    stored = exact_vectors(searcher.index.images)
    out = np.zeros((len(rows), searcher.index.dim), dtype=np.float32)
    missing = []
    for j, pos in enumerate(rows):
        r = where.get(str(df.iloc[pos]["image_id"]))
        if r is not None and stored is not None:
            out[j] = stored[r]
        elif r is not None:
            out[j] = searcher.index.images.reconstruct(int(r))
        else:
            missing.append(j)
    if missing:
        if callable(model) and not hasattr(model, "encode_images"):
            model = model()  # a loader, called only when needed
        model = model or searcher.index.load_model()
        paths = [str(row_image_path(df, rows[j])) for j in missing]
        out[missing] = np.asarray(model.encode_images(paths), dtype=np.float32)
    return out


def exemplars_for_rows(
    df: pd.DataFrame,
    rows: Sequence[int],
    searcher: Any,
    k: int,
    allowed_studies: Collection[str] | None = None,
    model: Any = None,
    target: str = "reports",
) -> dict[int, list[Exemplar]]:
    """Top-k exemplars per row: never the row's own study or patient; only `allowed_studies`.

    `target="reports"` searches image-to-report; `"images"` image-to-image (for sets without reports, where the
    neighbours serve the retrieval-only baseline).
    """
    if k <= 0 or not len(rows):
        return {int(p): [] for p in rows}
    vecs = query_vectors(df, rows, searcher, model)
    found = retrieve_exemplars(
        searcher,
        vecs,
        k,
        [str(df.iloc[p]["study_id"]) for p in rows],
        [str(df.iloc[p]["patient_id"]) for p in rows],
        allowed_studies,
        target,
    )
    return {int(p): ex for p, ex in zip(rows, found, strict=True)}
