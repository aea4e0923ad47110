"""The finding head fitted in closed form: ridge regression (sklearn) from the frozen visual tokens, 3x3-pooled as
the box head pools them (`box_head.box_features`), to each finding of `LABELS` (a linear probability model,
clipped to [0, 1]), with a prevalence-matched threshold per finding (`head.fit_thresholds`).

Why: the VLM's auxiliary head (`VLM.aux_head`, a linear layer on the mean *projected* token, trained beside the
LM) depends on the seed, because the projector under it starts random and trains for a few hundred steps. On the
demo's val split its macro-F1 was 0.482 / 0.442 / 0.377 over seeds 0-2, against 0.492 for this ridge on the
frozen tokens (penalty 1 x the mean squared feature norm; 0.494 at 0.1, 0.442 at 10; logistic regression
0.36-0.41; benchmarks/results/generation_demo.md). Fitted once at the end of training on the training rows, in
seconds; the `Generator` reads findings from it when the VLM folder has one (`finding_source="ridge"`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from generation.heads.box_head import pooled_features, ridge
from generation.heads.head import fit_thresholds

log = logging.getLogger(__name__)

FILE = "finding_head.safetensors"
LAMBDA = 1.0  # x the mean squared feature norm (the demo's val split, see the module docstring)


@dataclass
class FindingRidge:
    mean: np.ndarray  # (D,) feature mean of the training rows
    weights: np.ndarray  # (L, D)
    bias: np.ndarray  # (L,)
    thresholds: np.ndarray  # (L,)

    def probs(self, features: np.ndarray) -> np.ndarray:
        """(B, L) finding scores in [0, 1] for (B, D) `box_features` of the frozen tokens (as `BoxHead` takes)."""
        xc = features.astype(np.float64) - self.mean
        return np.clip(xc @ self.weights.T + self.bias, 0.0, 1.0)

    def save(self, out_dir: str | Path) -> None:
        from safetensors.numpy import save_file

        tensors = {k: np.ascontiguousarray(getattr(self, k), dtype=np.float32) for k in self.__dataclass_fields__}
        save_file(tensors, str(Path(out_dir) / FILE))

    @classmethod
    def load(cls, path: str | Path) -> FindingRidge | None:
        """The head saved in VLM folder `path`, or None when it has none."""
        f = Path(path) / FILE
        if not f.exists():
            return None
        from safetensors.numpy import load_file

        return cls(**{k: v.astype(np.float64) for k, v in load_file(str(f)).items()})


def fit_finding_ridge(
    visual: dict[int, torch.Tensor], label_rows: dict[int, torch.Tensor], lam: float = LAMBDA
) -> FindingRidge | None:
    """Fit on the rows that have both tokens (`visual`: row -> (n, d)) and labels (`label_rows`: row -> (L,)
    multi-hot); None without rows."""
    rows = sorted(r for r in visual if r in label_rows)
    if not rows:
        return None
    x = pooled_features(visual, rows).astype(np.float64)
    y = torch.stack([label_rows[r] for r in rows]).double().numpy()
    mean = x.mean(0)
    reg = ridge(x - mean, y, lam)
    weights, bias = np.reshape(reg.coef_, (y.shape[1], -1)), np.reshape(reg.intercept_, -1)
    head = FindingRidge(mean, weights, bias, np.zeros(y.shape[1]))
    head.thresholds = np.asarray(fit_thresholds(np.clip((x - mean) @ weights.T + bias, 0.0, 1.0), y))
    log.info("finding ridge: %d findings from %d rows", y.shape[1], len(rows))
    return head
