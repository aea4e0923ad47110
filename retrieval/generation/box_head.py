"""A box head on the frozen visual tokens: ridge regression from the tokens to each box name's box, and a ridge
presence score per finding box name. It answers `[ground]`, "where is the X?" and `[identify]` when the VLM has
one (`Generator(box_source="head")`, the default), the LM otherwise.

Why: the frozen tokens hold the boxes (a ridge regression from the 3x3-pooled tokens reaches IoU 0.97 for the
right lung against 0.86 for its mean box), but the small LM binds phrases to boxes loosely in a few hundred CPU
steps (left vs right) and spends steps on boxes that the findings need (benchmarks/results/generation_demo.md).
Fitted in closed form once at the end of training, on the training rows only, it costs seconds, not steps.

- features: the tokens (B, g*g, d) average-pooled to a 3x3 grid and flattened (`box_features`);
- box per name: kernel ridge (linear kernel, one kernel for all rows, centred per name) on the rows that have a box
  of that name, target = the name's largest box (x1, y1, x2, y2 in [0, 1]); names with fewer than `min_rows` rows
  are left to the LM;
- presence per finding name (not anatomy): ridge on every row (1 = has the box), threshold fitted as the finding
  head's (`head.fit_thresholds`: predicted as often as it occurs in the training rows).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from retrieval.generation.boxes import format_box
from retrieval.generation.head import fit_thresholds

log = logging.getLogger(__name__)

FILE = "box_head.safetensors"
POOL = 3
DEFAULT_LAMBDA = 0.1  # ridge penalty x the mean kernel diagonal (benchmarks/results/generation_demo.md)
MIN_ROWS = 8


def box_features(visual: torch.Tensor, pool: int = POOL) -> np.ndarray:
    """(B, n, d) tokens on a square grid -> (B, pool*pool*d) float32 (average-pooled, row-major)."""
    b, n, d = visual.shape
    g = int(round(n**0.5))
    if g * g != n:
        raise ValueError(f"box features need a square token grid, got {n} tokens")
    x = visual.float().reshape(b, g, g, d).permute(0, 3, 1, 2)
    x = torch.nn.functional.adaptive_avg_pool2d(x, min(pool, g))
    return x.flatten(1).numpy().astype(np.float32)


def _largest(boxes: Sequence[dict]) -> list[float]:
    b = max(boxes, key=lambda b: (b["x2"] - b["x1"]) * (b["y2"] - b["y1"]))
    return [float(b[k]) for k in ("x1", "y1", "x2", "y2")]


def _box_dict(box: np.ndarray) -> dict:
    return dict(zip(("x1", "y1", "x2", "y2"), map(float, box), strict=True))


def _ridge(kernel: np.ndarray, y: np.ndarray, lam: float) -> np.ndarray:
    """Dual coefficients for centred `kernel` (n, n) and centred targets `y` (n, t)."""
    n = len(kernel)
    reg = lam * max(float(np.trace(kernel)) / n, 1e-12)
    return np.linalg.solve(kernel + reg * np.eye(n), y)


def _centre(kernel: np.ndarray) -> np.ndarray:
    row = kernel.mean(0, keepdims=True)
    return kernel - row - row.T + kernel.mean()


@dataclass
class BoxHead:
    names: list[str]  # box names as written (`Right Lung`, `Calcified Granuloma`)
    anatomy: list[bool]
    mean: np.ndarray  # (D,) feature mean of the training rows
    weights: np.ndarray  # (P, D, 4)
    bias: np.ndarray  # (P, 4)
    presence: np.ndarray  # (P, D); zero rows for anatomy
    presence_bias: np.ndarray  # (P,)
    thresholds: np.ndarray  # (P,); inf for anatomy

    def index(self, name: str) -> int | None:
        low = name.strip().lower()
        return next((i for i, n in enumerate(self.names) if n.lower() == low), None)

    def boxes(self, features: np.ndarray) -> np.ndarray:
        """(B, P, 4) predicted boxes, clipped to [0, 1]."""
        xc = features.astype(np.float64) - self.mean
        return np.clip(np.einsum("bd,pdk->bpk", xc, self.weights) + self.bias, 0.0, 1.0)

    def presence_scores(self, features: np.ndarray) -> np.ndarray:
        """(B, P) presence scores (anatomy: -inf)."""
        xc = features.astype(np.float64) - self.mean
        s = xc @ self.presence.T + self.presence_bias
        s[:, np.asarray(self.anatomy)] = -np.inf
        return s

    def answer_ground(self, features: np.ndarray, phrases: Sequence[str]) -> list[str | None]:
        """`{<..>}` per (image, phrase), or None for a phrase the head does not know."""
        idx = [self.index(p) for p in phrases]
        boxes = self.boxes(features)
        return [None if j is None else format_box(_box_dict(boxes[i, j])) for i, j in enumerate(idx)]

    def answer_identify(self, features: np.ndarray) -> list[str]:
        """`Name {<..>}; ...` (most confident first) for the finding names above threshold, or `no findings`."""
        from retrieval.generation.boxes import format_findings

        boxes, scores = self.boxes(features), self.presence_scores(features)
        out = []
        for i in range(len(features)):
            on = [j for j in np.argsort(-scores[i]) if scores[i, j] > self.thresholds[j]]
            found = [{"label": self.names[j], **_box_dict(boxes[i, j])} for j in on]
            out.append(format_findings(found))
        return out

    def save(self, out_dir: str | Path) -> None:
        from safetensors.numpy import save_file

        tensors = {
            k: np.ascontiguousarray(getattr(self, k), dtype=np.float32)
            for k in ("mean", "weights", "bias", "presence", "presence_bias", "thresholds")
        }
        meta = {"names": json.dumps(self.names), "anatomy": json.dumps(self.anatomy)}
        save_file(tensors, str(Path(out_dir) / FILE), metadata=meta)

    @classmethod
    def load(cls, path: str | Path) -> BoxHead | None:
        """The head saved in VLM folder `path`, or None when it has none."""
        f = Path(path) / FILE
        if not f.exists():
            return None
        from safetensors import safe_open

        with safe_open(str(f), "np") as fh:
            meta = fh.metadata()
            t = {k: fh.get_tensor(k).astype(np.float64) for k in fh.keys()}  # noqa: SIM118
        return cls(json.loads(meta["names"]), json.loads(meta["anatomy"]), **t)


def fit_box_head(
    features: np.ndarray,
    row_boxes: Sequence[Sequence[dict]],
    names_anatomy: set[str] | None = None,
    lam: float = DEFAULT_LAMBDA,
    min_rows: int = MIN_ROWS,
) -> BoxHead | None:
    """Fit on (N, D) `features` and each row's labelled boxes (`label`, x1..y2 in [0, 1]); `names_anatomy`: the
    box names that are anatomy (no presence score). None when no name has `min_rows` rows."""
    names_anatomy = {n.lower() for n in (names_anatomy or set())}
    by_name: dict[str, dict[int, list[dict]]] = {}
    for r, boxes in enumerate(row_boxes):
        for b in boxes:
            by_name.setdefault(str(b["label"]), {}).setdefault(r, []).append(b)
    names = sorted(n for n, rows in by_name.items() if len(rows) >= min_rows)
    if not names:
        return None
    mean = features.astype(np.float64).mean(0)
    xc32 = (features - mean.astype(np.float32)).astype(np.float32)
    kernel = (xc32 @ xc32.T).astype(np.float64)  # float32 product: the one large matmul
    xc = xc32.astype(np.float64)
    n, d = xc.shape
    weights, bias = np.zeros((len(names), d, 4)), np.zeros((len(names), 4))
    targets: dict[tuple[int, ...], list[tuple[int, np.ndarray]]] = {}
    for p, name in enumerate(names):
        rows = tuple(sorted(by_name[name]))
        targets.setdefault(rows, []).append((p, np.array([_largest(by_name[name][r]) for r in rows])))
    for rows, items in targets.items():  # one solve per row set (every anatomy name shares the rows)
        sel = np.asarray(rows)
        y = np.concatenate([t for _, t in items], axis=1)
        ybar = y.mean(0)
        alpha = _ridge(_centre(kernel[np.ix_(sel, sel)]), y - ybar, lam)
        xs = xc[sel] - xc[sel].mean(0)
        w = xs.T @ alpha  # (D, 4 * names)
        m = xc[sel].mean(0)
        for q, (p, _) in enumerate(items):
            weights[p] = w[:, 4 * q : 4 * q + 4]
            bias[p] = ybar[4 * q : 4 * q + 4] - m @ weights[p]
    anatomy = [nm.lower() in names_anatomy for nm in names]
    presence, presence_bias = np.zeros((len(names), d)), np.zeros(len(names))
    thresholds = np.full(len(names), np.inf)
    finds = [p for p, a in enumerate(anatomy) if not a]
    if finds:
        t = np.zeros((n, len(finds)))
        for q, p in enumerate(finds):
            t[list(by_name[names[p]]), q] = 1.0
        tbar = t.mean(0)
        alpha = _ridge(kernel, t - tbar, lam)
        w = xc.T @ alpha
        presence[finds] = w.T
        presence_bias[finds] = tbar
        scores = xc @ w + tbar
        thresholds[finds] = fit_thresholds(scores, t)
    log.info("box head: %d names (%d findings) from %d rows", len(names), len(finds), n)
    return BoxHead(names, anatomy, mean, weights, bias, presence, presence_bias, thresholds)


def fit_for_examples(
    visual: dict[int, torch.Tensor], examples: dict[str, Sequence], lam: float = DEFAULT_LAMBDA
) -> BoxHead | None:
    """The head for a training run: each row's boxes from its `[ground]` examples (anatomy and findings, merged as
    the targets are), else from its `[identify]` examples; None without box examples."""
    from retrieval.generation.tasks import is_anatomy

    row_boxes: dict[int, list[dict]] = {}
    for e in examples.get("ground") or []:
        row_boxes.setdefault(e.row, []).extend({**b, "label": e.info["phrase"]} for b in e.info["boxes"])
    if not row_boxes:
        for e in examples.get("identify") or []:
            row_boxes.setdefault(e.row, []).extend(e.info.get("boxes") or [])
    rows = sorted(r for r in row_boxes if r in visual)
    if not rows:
        return None
    feats = np.concatenate(
        [box_features(torch.stack([visual[r] for r in rows[i : i + 256]])) for i in range(0, len(rows), 256)]
    )
    names = {str(b["label"]) for r in rows for b in row_boxes[r]}
    return fit_box_head(feats, [row_boxes[r] for r in rows], {n for n in names if is_anatomy(n)}, lam)
