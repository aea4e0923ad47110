"""A box head on the frozen visual tokens: ridge regression (sklearn) from the tokens to a box per box *group*,
and a ridge presence score per finding group. It answers `[ground]`, "where is the X?" and `[identify]` when the
VLM has one (`Generator(box_source="head")`, the default), the LM otherwise.

Why: the frozen tokens hold the boxes (a ridge regression from the 3x3-pooled tokens reaches IoU 0.97 for the
right lung against 0.86 for its mean box), but the small LM binds phrases to boxes loosely in a few hundred CPU
steps (left vs right) and spends steps on boxes that the findings need (benchmarks/results/generation_demo.md).
Fitted in closed form once at the end of training, on the training rows only, it costs seconds, not steps.

- features: the tokens (B, g*g, d) average-pooled to a 3x3 grid and flattened (`box_features`);
- groups: one per anatomy name; a finding name whose boxes lie left *or* right of the midline (fewer than half
  of the box centres within 0.1 of x = 0.5: TB lesions, nodules, effusions) gets one group per image half
  (`left` / `right`, by box centre), other findings one (`all`). One regression per name put a lesion that sits in
  the left or the right lung between the two (benchmarks/results/generation_tbx11k.md);
- box per group: ridge on the rows that have a box of the group, target = the group's largest box (x1, y1, x2, y2
  in [0, 1]); groups with fewer than `min_rows` rows are left out (a name without groups goes to the LM);
- presence per finding group: ridge on every row (1 = has a box of the group), threshold fitted as the finding
  head's (`head.fit_thresholds`: predicted as often as it occurs in the training rows). `[identify]` lists every
  group above its threshold, same-name boxes that overlap (IoU > 0.5) merged to the higher-scored one;
  `detections` lists every finding group with its score (`score` in the box dicts), the ranked list mAP reads.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from generation.data.boxes import boxes_tensor, boxes_text, snap
from generation.heads.head import fit_thresholds

log = logging.getLogger(__name__)

FILE = "box_head.safetensors"
POOL = 3
DEFAULT_LAMBDA = 0.1  # box ridge penalty x the mean squared feature norm (benchmarks/results/generation_demo.md)
PRESENCE_LAMBDA = (
    1.0  # presence ridge penalty, the same scale (TBX11K val split: benchmarks/results/generation_tbx11k.md)
)
MIN_ROWS = 8
MIDLINE_BAND = 0.1  # a box centre within this of x = 0.5 is "on the midline"
SIDES = ("all", "left", "right")


def box_features(visual: torch.Tensor, pool: int = POOL) -> np.ndarray:
    """(B, n, d) tokens on a square grid -> (B, pool*pool*d) float32 (average-pooled, row-major)."""
    b, n, d = visual.shape
    g = int(round(n**0.5))
    if g * g != n:
        raise ValueError(f"box features need a square token grid, got {n} tokens")
    x = visual.float().reshape(b, g, g, d).permute(0, 3, 1, 2)
    x = torch.nn.functional.adaptive_avg_pool2d(x, min(pool, g))
    return x.flatten(1).cpu().numpy().astype(np.float32)


def pooled_features(visual: dict[int, torch.Tensor], rows: Sequence[int], chunk: int = 256) -> np.ndarray:
    """`box_features` of the tokens of `rows` (`visual`: row -> (n, d)), stacked in chunks of `chunk` rows."""
    return np.concatenate(
        [box_features(torch.stack([visual[r] for r in rows[i : i + chunk]])) for i in range(0, len(rows), chunk)]
    )


def _largest(boxes: Sequence[dict]) -> list[float]:
    b = max(boxes, key=lambda b: (b["x2"] - b["x1"]) * (b["y2"] - b["y1"]))
    return [float(b[k]) for k in ("x1", "y1", "x2", "y2")]


def image_side(box: dict) -> str:
    """The image half a box's centre lies in: `left` or `right` (the box head's and the training prior's groups)."""
    return "left" if (box["x1"] + box["x2"]) / 2 < 0.5 else "right"


def _box_dict(box: np.ndarray, **extra) -> dict:
    """A valid box as it reads back from text (x1 < x2, y1 < y2 on the 0-100 grid), with `extra` keys."""
    b = snap(dict(zip(("x1", "y1", "x2", "y2"), map(float, box), strict=True)))
    b.pop("label")
    return {**extra, **b}


def ridge(x: np.ndarray, y: np.ndarray, lam: float):
    """sklearn Ridge on (n, D) `x` -> (n, t) `y` (intercept unpenalised), penalty `lam` x the mean squared norm of
    the centred rows (so `lam` does not depend on the feature scale)."""
    from sklearn.linear_model import Ridge

    scale = float(((x - x.mean(0)) ** 2).sum(1).mean())
    return Ridge(alpha=lam * max(scale, 1e-12)).fit(x, y)


@dataclass
class BoxHead:
    names: list[str]  # per group: the box name as written (`Right Lung`, `Active Tuberculosis`)
    sides: list[str]  # per group: `all`, `left` or `right` (the image half its boxes' centres lie in)
    anatomy: list[bool]
    mean: np.ndarray  # (D,) feature mean of the training rows
    weights: np.ndarray  # (P, D, 4)
    bias: np.ndarray  # (P, 4)
    presence: np.ndarray  # (P, D); zero rows for anatomy
    presence_bias: np.ndarray  # (P,)
    thresholds: np.ndarray  # (P,); inf for anatomy

    def groups(self, name: str) -> list[int]:
        """The groups of box name `name` (case-insensitive)."""
        low = name.strip().lower()
        return [i for i, n in enumerate(self.names) if n.lower() == low]

    def boxes(self, features: np.ndarray) -> np.ndarray:
        """(B, P, 4) predicted boxes, clipped to [0, 1]."""
        xc = features.astype(np.float64) - self.mean
        return np.clip(np.einsum("bd,pdk->bpk", xc, self.weights) + self.bias, 0.0, 1.0)

    def presence_scores(self, features: np.ndarray) -> np.ndarray:
        """(B, P) presence scores (anatomy: -inf)."""
        xc = features.astype(np.float64) - self.mean
        s = xc @ self.presence.T + self.presence_bias
        s[:, np.asarray(self.anatomy, dtype=bool)] = -np.inf
        return s

    def ground(self, features: np.ndarray, phrases: Sequence[str]) -> list[list[dict] | None]:
        """Boxes per (image, phrase), or None for a phrase the head does not know: an unsided name's box; for a
        sided finding the halves whose presence passes its threshold (the most likely half when none does)."""
        boxes, scores = self.boxes(features), self.presence_scores(features)
        out: list[list[dict] | None] = []
        for i, phrase in enumerate(phrases):
            gs = self.groups(phrase)
            if not gs:
                out.append(None)
                continue
            on = [g for g in gs if scores[i, g] > self.thresholds[g]] or [max(gs, key=lambda g: scores[i, g])]
            out.append([_box_dict(boxes[i, g], label=self.names[g]) for g in sorted(on, key=lambda g: -scores[i, g])])
        return out

    def answer_ground(self, features: np.ndarray, phrases: Sequence[str]) -> list[str | None]:
        """`{<..>}` (one per box) per (image, phrase), or None for a phrase the head does not know."""
        return [None if bs is None else boxes_text("ground", bs) for bs in self.ground(features, phrases)]

    def identify(self, features: np.ndarray) -> list[list[dict]]:
        """Per image, the finding groups above threshold as `{label, x1..y2, score}` (highest score first; same-name
        boxes with IoU > 0.5 merged to the higher-scored one): the `[identify]` answer."""
        return self._scored_boxes(features, thresholded=True)

    def detections(self, features: np.ndarray) -> list[list[dict]]:
        """Per image, *every* finding group's box with its presence score, merged as in `identify`: the ranked
        candidate list a detector hands to COCO-style mAP (which scores all detections, up to 100 per image, by
        score), where `identify` is the answer a reader sees."""
        return self._scored_boxes(features, thresholded=False)

    def _scored_boxes(self, features: np.ndarray, thresholded: bool) -> list[list[dict]]:
        from torchvision.ops import batched_nms

        boxes, scores = self.boxes(features), self.presence_scores(features)
        out = []
        for i in range(len(features)):
            order = [g for g in np.argsort(-scores[i], kind="stable") if np.isfinite(scores[i, g])]
            on = [g for g in order if scores[i, g] > self.thresholds[g]] if thresholded else order
            found = [_box_dict(boxes[i, g], label=self.names[g], score=float(scores[i, g])) for g in on]
            if len(found) > 1:
                names = sorted({b["label"] for b in found})
                keep = batched_nms(
                    boxes_tensor(found).double(),
                    torch.tensor([b["score"] for b in found], dtype=torch.float64),
                    torch.tensor([names.index(b["label"]) for b in found]),
                    0.5,
                )
                found = [found[k] for k in sorted(keep.tolist())]
            out.append(found)
        return out

    def answer_identify(self, features: np.ndarray) -> list[str]:
        """`Name {<..>}; ...` (most confident first) for the finding groups above threshold, or `no findings`."""
        return [boxes_text("identify", f) for f in self.identify(features)]

    def save(self, out_dir: str | Path) -> None:
        arrays = ("mean", "weights", "bias", "presence", "presence_bias", "thresholds")
        meta = {k: json.dumps(getattr(self, k)) for k in ("names", "sides", "anatomy")}
        save_head(Path(out_dir) / FILE, {k: getattr(self, k) for k in arrays}, meta)

    @classmethod
    def load(cls, path: str | Path) -> BoxHead | None:
        """The head saved in VLM folder `path`, or None when it has none."""
        if (saved := load_head(Path(path) / FILE)) is None:
            return None
        meta, t = saved
        names = json.loads(meta["names"])
        sides = json.loads(meta["sides"]) if "sides" in meta else ["all"] * len(names)  # heads saved before sides
        return cls(names, sides, json.loads(meta["anatomy"]), **t)


def save_head(path: Path, arrays: dict[str, np.ndarray], meta: dict[str, str]) -> None:
    """A closed-form head's arrays (float32) and its string metadata in one safetensors file (the box and segment
    heads)."""
    from safetensors.numpy import save_file

    save_file({k: np.ascontiguousarray(v, dtype=np.float32) for k, v in arrays.items()}, str(path), metadata=meta)


def load_head(path: Path) -> tuple[dict[str, str], dict[str, np.ndarray]] | None:
    """(metadata, arrays as float64) of a file `save_head` wrote, or None when there is none."""
    if not path.exists():
        return None
    from safetensors import safe_open

    with safe_open(str(path), "np") as fh:
        return fh.metadata(), {k: fh.get_tensor(k).astype(np.float64) for k in fh.keys()}  # noqa: SIM118


def _groups(
    row_boxes: Sequence[Sequence[dict]], names_anatomy: set[str], min_rows: int
) -> dict[tuple[str, str], dict[int, list[dict]]]:
    """{(name, side): {row: that group's boxes}} for the groups with at least `min_rows` rows (see the module
    docstring for which names are split by image half)."""
    by_name: dict[str, dict[int, list[dict]]] = {}
    for r, boxes in enumerate(row_boxes):
        for b in boxes:
            by_name.setdefault(str(b["label"]), {}).setdefault(r, []).append(b)
    out: dict[tuple[str, str], dict[int, list[dict]]] = {}
    for name in sorted(by_name):
        rows = by_name[name]
        centres = np.array([(b["x1"] + b["x2"]) / 2 for bs in rows.values() for b in bs])
        sided = name.lower() not in names_anatomy and np.mean(np.abs(centres - 0.5) < MIDLINE_BAND) < 0.5
        for r, bs in rows.items():
            for b in bs:
                out.setdefault((name, image_side(b) if sided else "all"), {}).setdefault(r, []).append(b)
    return {k: v for k, v in out.items() if len(v) >= min_rows}


def fit_box_head(
    features: np.ndarray,
    row_boxes: Sequence[Sequence[dict]],
    names_anatomy: set[str] | None = None,
    lam: float = DEFAULT_LAMBDA,
    min_rows: int = MIN_ROWS,
    presence_lam: float = PRESENCE_LAMBDA,
) -> BoxHead | None:
    """Fit on (N, D) `features` and each row's labelled boxes (`label`, x1..y2 in [0, 1]); `names_anatomy`: the
    box names that are anatomy (no presence score). None when no group has `min_rows` rows."""
    names_anatomy = {n.lower() for n in (names_anatomy or set())}
    groups = _groups(row_boxes, names_anatomy, min_rows)
    if not groups:
        return None
    keys = list(groups)
    mean = features.astype(np.float64).mean(0)
    xc = features.astype(np.float64) - mean
    n, d = xc.shape
    weights, bias = np.zeros((len(keys), d, 4)), np.zeros((len(keys), 4))
    by_rows: dict[tuple[int, ...], list[int]] = {}
    for p, key in enumerate(keys):
        by_rows.setdefault(tuple(sorted(groups[key])), []).append(p)
    for rows, ps in by_rows.items():  # one fit per row set (every anatomy name shares the rows)
        sel = np.asarray(rows)
        y = np.concatenate([[_largest(groups[keys[p]][r]) for r in rows] for p in ps], axis=1)
        reg = ridge(xc[sel], y, lam)
        for q, p in enumerate(ps):
            weights[p] = reg.coef_[4 * q : 4 * q + 4].T
            bias[p] = reg.intercept_[4 * q : 4 * q + 4]
    anatomy = [name.lower() in names_anatomy for name, _ in keys]
    presence, presence_bias = np.zeros((len(keys), d)), np.zeros(len(keys))
    thresholds = np.full(len(keys), np.inf)
    finds = [p for p, a in enumerate(anatomy) if not a]
    if finds:
        t = np.zeros((n, len(finds)))
        for q, p in enumerate(finds):
            t[list(groups[keys[p]]), q] = 1.0
        reg = ridge(xc, t, presence_lam)
        presence[finds] = np.reshape(reg.coef_, (len(finds), d))  # sklearn drops the axis of one target
        presence_bias[finds] = np.reshape(reg.intercept_, -1)
        thresholds[finds] = fit_thresholds(np.reshape(reg.predict(xc), (n, -1)), t)
    log.info("box head: %d groups (%d findings) from %d rows", len(keys), len(finds), n)
    names, sides = [k[0] for k in keys], [k[1] for k in keys]
    return BoxHead(names, sides, anatomy, mean, weights, bias, presence, presence_bias, thresholds)


def fit_for_examples(
    visual: dict[int, torch.Tensor], examples: dict[str, Sequence], lam: float = DEFAULT_LAMBDA
) -> BoxHead | None:
    """The head for a training run: each row's boxes from its `[ground]` examples (anatomy and findings, merged as
    the targets are), else from its `[identify]` examples; None without box examples."""
    from generation.data.tasks import is_anatomy

    row_boxes: dict[int, list[dict]] = {}
    for e in examples.get("ground") or []:
        row_boxes.setdefault(e.row, []).extend({**b, "label": e.info["phrase"]} for b in e.info["boxes"])
    if not row_boxes:
        for e in examples.get("identify") or []:
            row_boxes.setdefault(e.row, []).extend(e.info.get("boxes") or [])
    rows = sorted(r for r in row_boxes if r in visual)
    if not rows:
        return None
    feats = pooled_features(visual, rows)
    names = {str(b["label"]) for r in rows for b in row_boxes[r]}
    return fit_box_head(feats, [row_boxes[r] for r in rows], {n for n in names if is_anatomy(n)}, lam)
