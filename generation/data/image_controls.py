"""Proof that a VLM reads the image: the same evaluation with the image replaced (LLaVA-Med found theirs did not).

`apply_image_control(gen, visual, exemplars, df, kind)` replaces each evaluated image by
- `blank`: one mid-grey image for every row;
- `noise`: uniform noise, a different draw per row;
- `other`: another evaluated study's image (a derangement: never the row's own).
The visual tokens change, and so do the exemplars, which are retrieved for the replacement image (training
studies only, never the row's own study or patient), so retrieval cannot carry the real image in by the back door.
A VLM that reads the image drops to the constant on `blank` and `noise`, and to shuffled answers on `other`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd
import torch

IMAGE_CONTROLS = ("real", "blank", "noise", "other")
SIZE = 224  # pixels of the replacement images (the encoders resize anyway)


def derangement(n: int, rng: np.random.Generator) -> np.ndarray:
    """A permutation of range(n) with no fixed point (n >= 2)."""
    while True:
        p = rng.permutation(n)
        if n < 2 or not (p == np.arange(n)).any():
            return p


def prompt_derangement(prompts: list[str], rng: np.random.Generator) -> np.ndarray:
    """An order that gives each example the answer of another example with the same prompt (another test image
    asked the same question or phrase), so that shuffled answers stay answers to the question asked. A prompt asked
    of one image only keeps its own answer (no other image answered it)."""
    order = np.arange(len(prompts))
    groups: dict[str, list[int]] = {}
    for i, p in enumerate(prompts):
        groups.setdefault(p, []).append(i)
    for idx in groups.values():
        if len(idx) > 1:
            order[idx] = np.asarray(idx)[derangement(len(idx), rng)]
    return order


def _replacement_images(kind: str, n: int, rng: np.random.Generator) -> list[np.ndarray]:
    if kind == "blank":
        return [np.full((SIZE, SIZE), 0.5, dtype=np.float32)] * n
    return [rng.random((SIZE, SIZE), dtype=np.float32) for _ in range(n)]


def apply_image_control(
    gen: Any,
    visual: dict[int, torch.Tensor],
    exemplars: dict[int, list],
    df: pd.DataFrame,
    kind: str,
    k: int,
    allowed_studies: Sequence[str] | None = None,
    seed: int = 0,
) -> tuple[dict[int, torch.Tensor], dict[int, list]]:
    """(visual tokens, exemplars) per row with every image replaced as `kind` says (see the module docstring)."""
    if kind not in IMAGE_CONTROLS:
        raise ValueError(f"unknown image control {kind!r}; choose from {IMAGE_CONTROLS}")
    if kind == "real":
        return visual, exemplars
    rows = sorted(visual)
    rng = np.random.default_rng(seed)
    studies = [str(df.iloc[r]["study_id"]) for r in rows]
    patients = [str(df.iloc[r]["patient_id"]) for r in rows]
    if kind == "other":
        perm = derangement(len(rows), rng)
        new_visual = {r: visual[rows[perm[i]]] for i, r in enumerate(rows)}
        new_ex = {}
        for i, r in enumerate(rows):  # the other study's exemplars, less any of this row's study or patient
            theirs = exemplars.get(rows[perm[i]], [])
            new_ex[r] = [e for e in theirs if e.study_id != studies[i] and e.patient_id != patients[i]]
        return new_visual, new_ex
    images = _replacement_images(kind, len(rows), rng)
    tokens = gen.visual(images).float()
    new_visual = {r: tokens[i] for i, r in enumerate(rows)}
    new_ex: dict[int, list] = {r: [] for r in rows}
    if k > 0 and gen.searcher is not None:
        from generation.data.rag import retrieve_exemplars

        vecs = np.asarray(gen.retrieval_model().encode_images(images), dtype=np.float32)
        found = retrieve_exemplars(gen.searcher, vecs, k, studies, patients, allowed_studies=allowed_studies)
        new_ex = dict(zip(rows, found, strict=True))
    return new_visual, new_ex
