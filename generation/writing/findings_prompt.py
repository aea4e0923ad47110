"""The finding head's predictions as prompt text: the "Likely findings" line a pretrained LM writes the report and
answers questions from (AnatomiX's findings block beside the retrieved exemplars), in `[report]` and `[vqa]` prompts.

    Likely findings: right pleural effusion (0.82), cardiomegaly (0.64).
    Likely findings: none.

Each predicted finding (probability above its fitted threshold, most likely first; `head.
predicted_findings`) in lower case, with the patient's side where the box head places it (`finding_sides`) and
the head's probability. During training the line comes from cross-fitted predictions (`crossfit_probs`: each
training row's from a ridge fitted without its fold), so the LM learns from the head's real errors, not from
in-sample predictions that are almost always right.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd
import torch

from generation.heads.head import predicted_findings
from retrieval.labels import LABELS

PREFIX = "Likely findings:"
TASKS = ("report", "vqa")  # the prompts that carry the line: the LM writes the report and answers questions from it
NONE = "none"
NONE_LINE = f"{PREFIX} {NONE}."  # the line of an image with no predicted finding (and contrastive decoding's contrast)
LABEL_PROB = 0.9  # the probability a training line from true labels shows (findings_lines(source="labels"))


def findings_line(
    probs: np.ndarray, thresholds: Sequence[float], sides: Mapping[str, str] | None = None, top: int = 5
) -> str:
    """The prompt line for one image's finding probabilities (L,) (see the module docstring); at most `top`."""
    sides = sides or {}
    found = predicted_findings(probs, thresholds)[:top]
    index = {lab: j for j, lab in enumerate(LABELS)}
    parts = []
    for lab in found:
        side = f"{sides[lab]} " if lab in sides else ""
        parts.append(f"{side}{lab.lower()} ({float(probs[index[lab]]):.2f})")
    return f"{PREFIX} {', '.join(parts)}." if parts else NONE_LINE


def crossfit_probs(
    visual: dict[int, torch.Tensor], label_rows: dict[int, torch.Tensor], folds: int = 5, seed: int = 0
) -> tuple[dict[int, np.ndarray], list[float]]:
    """Each row's finding probabilities from a finding ridge fitted on the other folds, and the thresholds of the
    ridge fitted on every row (the ones used at inference)."""
    from generation.heads.box_head import pooled_features
    from generation.heads.finding_ridge import fit_finding_ridge

    rows = sorted(r for r in visual if r in label_rows)
    full = fit_finding_ridge(visual, label_rows)
    if full is None:
        return {}, []
    order = np.random.default_rng(seed).permutation(len(rows))
    out: dict[int, np.ndarray] = {}
    for f in range(min(folds, len(rows))):
        held = [rows[i] for i in order[f::folds]]
        keep = set(held)
        rest = {r: visual[r] for r in rows if r not in keep}
        head = (fit_finding_ridge(rest, label_rows) if rest else None) or full
        probs = head.probs(pooled_features(visual, held))
        out.update(zip(held, probs, strict=True))
    return out, [float(t) for t in full.thresholds]


def true_sides(boxes: Sequence[dict]) -> dict[str, str]:
    """A training row's finding sides from its own finding boxes (the box head's job at inference)."""
    from generation.data.tasks import finding_boxes
    from generation.writing.findings_report import finding_sides

    return finding_sides([{**b, "score": 1.0} for b in finding_boxes(boxes)])


def findings_lines(
    df: pd.DataFrame,
    visual: dict[int, torch.Tensor],
    label_rows: dict[int, torch.Tensor],
    seed: int,
    source: str = "crossfit",
) -> dict[int, str]:
    """Each training row's "Likely findings" line, with the sides of its own finding boxes: from cross-fitted
    finding-ridge predictions (`source="crossfit"`, the head's real errors), or from the row's own labels
    (`"labels"`: every true finding at probability `LABEL_PROB`, so the LM learns to write what the line says)."""
    if source == "labels":
        probs = {r: np.where(t.numpy() > 0, LABEL_PROB, 0.0) for r, t in label_rows.items() if r in visual}
        thresholds = [0.5] * len(LABELS)
    else:
        probs, thresholds = crossfit_probs(visual, label_rows, seed=seed)
    out = {}
    for r, p in probs.items():
        boxes = df.iloc[r].get("boxes") if "boxes" in df.columns else None
        boxes = [b for b in (boxes if isinstance(boxes, list | tuple | np.ndarray) else []) if isinstance(b, dict)]
        out[r] = findings_line(p, thresholds, true_sides(boxes))
    return out
