"""A segmentation head on the frozen visual tokens: the `[segment]` task's model part (PaliGemma-CXR's fifth task).

Given an image's tokens and a region name (`Right Lung`, `Heart`, a drawn finding such as `Pleural Effusion`), it
returns the region's mask: a bool array at the image's size, and polygons (normalised [0, 1] x/y lists) for a reader.

How, in closed form like the box head (`generation/heads/box_head.py`), fitted in seconds on the training rows' masks:
- features: the tokens (B, g*g, d) average-pooled to a `pool` x `pool` grid and flattened (`box_head.box_features`;
  `pool` = the token grid keeps every token);
- targets: each training mask area-averaged to a `grid` x `grid` map (the share of each cell the region covers),
  then written as its region's mean map plus its first `components` principal components (a shape model; a ridge
  fit's answers are combinations of the training maps anyway, so little is lost and the head stays small: the
  weights are D x K per region, not D x grid^2);
- ridge (`box_head.ridge`: sklearn, the penalty scaled by the features' mean squared norm) from the centred features
  to the component coefficients, on the rows that hold the region (regions with fewer than `min_rows` rows are left
  out, so `segment` answers None for them and a caller can fall back to the box head or the LM);
- answer: the predicted map, upsampled bilinearly to the image's size, cut at 0.5. A region the head places
  nowhere above 0.5 (a finding it is unsure where to put) is cut at half its peak instead: asked for a region, it
  answers with the most likely area, as `[ground]` answers with a box.

It answers where the named region is; whether a finding is present at all is the finding head's question.

Measured on the demo (`benchmarks/segment_demo.py` -> `benchmarks/results/segment_demo.md`: 700 phantoms, 630 to
fit, 70 to test, frozen cxr-small tokens): on the organs it reads the image (mean IoU 0.935 over the lungs and the
heart, against 0.796 for the mean training mask, 0.727 for shuffled masks, 0.699 for the box head's box and 0.703
for even the true box), and the whole-chest findings likewise (cardiomegaly, emphysema, low lung volumes). It does
not place focal findings: nodules, granulomas, atelectasis and scarring score near 0 (as the box head does), far
below the true box. Every token (`pool` 7) beats the 3x3 pooling on the organs (0.935 against 0.928) and on 10
of the 14 regions. The trainable alternative (a small torch decoder on the same feature map, the benchmark's
`--decoder` arm) loses on the organs (0.910) and costs 7x the fit time, but wins on the findings (mean 0.358
against 0.329; consolidation 0.284 against 0.143), so it is the next step for focal findings; it is not in the
library yet.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from generation.heads.box_head import box_features, load_head, ridge, save_head
from retrieval.data.region_masks import encode_rle, mask_to_polygons, resize_mask
from retrieval.labels import ANATOMY_PREFIX

log = logging.getLogger(__name__)

FILE = "segment_head.safetensors"
GRID = 32  # the resolution the head predicts a mask at (upsampled to the image's size)
POOL = 7  # token grid the features keep (cxr-small's 7x7 at 224 px: every token; benchmarks/results/segment_demo.md)
COMPONENTS = 48  # principal components of a region's training maps
DEFAULT_LAMBDA = 0.1  # ridge penalty x the mean squared feature norm
MIN_ROWS = 8

MAX_FIT_ROWS = 630  # rows `fit_for_rows` fits on by default (benchmarks/results/segment_demo.md fitted 630)


def segment_features(tokens: torch.Tensor, pool: int = POOL) -> np.ndarray:
    """(B, n, d) or (n, d) tokens on a square grid -> (B, D) float32 features the head reads."""
    t = torch.as_tensor(tokens)
    return box_features(t[None] if t.ndim == 2 else t, pool)


def region_key(name: str) -> str:
    """How a region name is matched: case-insensitive, with or without the `anatomy:` prefix."""
    low = name.strip().lower()
    return low[len(ANATOMY_PREFIX) :] if low.startswith(ANATOMY_PREFIX) else low


@dataclass
class SegmentHead:
    names: list[str]  # per region: its name as the masks store it (`anatomy:Right Lung`, `Pleural Effusion`)
    pool: int
    grid: int
    mean: np.ndarray  # (D,) feature mean of the training rows
    weights: np.ndarray  # (R, D, K) ridge weights to each region's component coefficients
    bias: np.ndarray  # (R, K)
    components: np.ndarray  # (R, K, grid*grid); zero rows where a region has fewer components
    map_mean: np.ndarray  # (R, grid*grid) the region's mean training map

    def region(self, name: str) -> int | None:
        """The index of region `name` (case-insensitive, `anatomy:` optional), or None when the head lacks it."""
        key = region_key(name)
        return next((i for i, n in enumerate(self.names) if region_key(n) == key), None)

    def features(self, tokens: torch.Tensor) -> np.ndarray:
        """The features of (B, n, d) tokens at this head's pooling."""
        return segment_features(tokens, self.pool)

    def soft_maps(self, features: np.ndarray, region: int) -> np.ndarray:
        """(B, grid, grid) predicted share of each cell the region covers, clipped to [0, 1]."""
        if np.shape(features)[-1] != len(self.mean):
            raise ValueError(f"segment head: features of {np.shape(features)[-1]} values, fitted on {len(self.mean)}")
        xc = np.asarray(features, dtype=np.float64) - self.mean
        coef = xc @ self.weights[region] + self.bias[region]
        maps = self.map_mean[region] + coef @ self.components[region]
        return np.clip(maps, 0.0, 1.0).reshape(-1, self.grid, self.grid).astype(np.float32)

    def segment(self, features: np.ndarray, name: str, size: int | tuple[int, int]) -> np.ndarray | None:
        """(B, H, W) bool masks of region `name` at `size` (H, W), or None for a region the head does not know."""
        r = self.region(name)
        if r is None:
            return None
        return masks_from_maps(resize_mask(self.soft_maps(features, r), size))

    def save(self, out_dir: str | Path) -> None:
        """`segment_head.safetensors` in `out_dir` (a VLM folder, beside `box_head.safetensors`)."""
        arrays = {k: getattr(self, k) for k in ("mean", "weights", "bias", "components", "map_mean")}
        meta = {"names": json.dumps(self.names), "pool": str(self.pool), "grid": str(self.grid)}
        save_head(Path(out_dir) / FILE, arrays, meta)

    @classmethod
    def load(cls, path: str | Path) -> SegmentHead | None:
        """The head saved in folder `path`, or None when it has none."""
        if (saved := load_head(Path(path) / FILE)) is None:
            return None
        meta, t = saved
        return cls(json.loads(meta["names"]), int(meta["pool"]), int(meta["grid"]), **t)


def masks_from_maps(maps: np.ndarray) -> np.ndarray:
    """(B, H, W) soft maps -> bool masks: above 0.5, or above half its peak for a map that never reaches 0.5."""
    out = maps > 0.5
    for i in range(len(maps)):
        peak = float(maps[i].max())
        if not out[i].any() and peak > 0:
            out[i] = maps[i] >= 0.5 * peak
    return out


def _region_rows(row_masks: Sequence[Mapping[str, np.ndarray]], min_rows: int) -> dict[str, list[int]]:
    """{region: the rows holding a non-empty mask of it}, for regions in at least `min_rows` rows."""
    rows: dict[str, list[int]] = {}
    for r, masks in enumerate(row_masks):
        for name, m in masks.items():
            if np.any(m):
                rows.setdefault(name, []).append(r)
    return {k: v for k, v in sorted(rows.items()) if len(v) >= min_rows}


def fit_segment_head(
    features: np.ndarray,
    row_masks: Sequence[Mapping[str, np.ndarray]],
    pool: int = POOL,
    lam: float = DEFAULT_LAMBDA,
    grid: int = GRID,
    components: int = COMPONENTS,
    min_rows: int = MIN_ROWS,
) -> SegmentHead | None:
    """Fit on (N, D) `features` (`segment_features` at `pool`) and each row's {region: bool mask}; None when no
    region has `min_rows` rows."""
    regions = _region_rows(row_masks, min_rows)
    if not regions:
        return None
    mean = features.astype(np.float64).mean(0)
    xc = features.astype(np.float64) - mean
    names = list(regions)
    d, k, cells = xc.shape[1], components, grid * grid
    weights, bias = np.zeros((len(names), d, k)), np.zeros((len(names), k))
    comps, map_mean = np.zeros((len(names), k, cells)), np.zeros((len(names), cells))
    coefs: dict[int, np.ndarray] = {}
    for p, name in enumerate(names):
        maps = resize_mask(np.stack([row_masks[r][name] for r in regions[name]]), grid).reshape(-1, cells)
        map_mean[p] = maps.mean(0)
        _, _, vt = np.linalg.svd(maps - map_mean[p], full_matrices=False)
        kp = min(k, len(vt))
        comps[p, :kp] = vt[:kp]
        coefs[p] = (maps - map_mean[p]) @ comps[p].T  # (n_p, k), zero columns past kp
    by_rows: dict[tuple[int, ...], list[int]] = {}
    for p, name in enumerate(names):  # one fit per row set (the anatomy regions share every row)
        by_rows.setdefault(tuple(regions[name]), []).append(p)
    for rows, ps in by_rows.items():
        reg = ridge(xc[list(rows)], np.concatenate([coefs[p] for p in ps], axis=1), lam)
        for q, p in enumerate(ps):
            weights[p] = reg.coef_[k * q : k * q + k].T
            bias[p] = reg.intercept_[k * q : k * q + k]
    log.info("segment head: %d regions from %d rows", len(names), len(row_masks))
    return SegmentHead(names, pool, grid, mean, weights, bias, comps, map_mean)


def fit_for_rows(
    visual: Mapping[int, torch.Tensor],
    masks: Mapping[int, Mapping[str, np.ndarray]],
    max_rows: int | None = MAX_FIT_ROWS,
    **options: Any,
) -> SegmentHead | None:
    """The head for a training run: `visual` {row: (n, d) tokens} (the VLM's token cache), `masks` {row: {region:
    bool mask}} (e.g. `region_masks.masks_from_json` of the manifest's `masks` cells); rows in both are used, at
    most `max_rows` of them (a seeded sample: the fit's cost grows with the rows, and the demo's benchmark measured
    the head fitted on 630; None = all)."""
    rows = sorted(r for r in masks if r in visual and masks[r])
    if not rows:
        return None
    if max_rows is not None and len(rows) > max_rows:
        rows = sorted(np.random.default_rng(0).choice(rows, max_rows, replace=False).tolist())
    grid = int(round(visual[rows[0]].shape[-2] ** 0.5))  # tokens pooled coarser than `pool` keep their grid
    pool = min(int(options.pop("pool", POOL)), grid)
    feats = np.concatenate([segment_features(visual[r], pool) for r in rows])
    return fit_segment_head(feats, [masks[r] for r in rows], pool=pool, **options)


def fit_for_manifest(visual: Mapping[int, torch.Tensor], df: Any) -> SegmentHead | None:
    """`fit_for_rows` on the rows of `df` (a manifest with a `masks` column) that have tokens in `visual` and a
    non-empty masks cell (only those cells are decoded)."""
    from retrieval.data.region_masks import masks_from_json

    cells = {r: df.iloc[r]["masks"] for r in visual}
    return fit_for_rows(
        visual, {r: masks_from_json(c) for r, c in cells.items() if isinstance(c, str) and c not in ("", "{}")}
    )


def segment(
    head: SegmentHead, tokens_or_image: Any, region: str, size: int | tuple[int, int] | None = None, encoder: Any = None
) -> dict | None:
    """The `[segment]` answer for one image: `{"region", "mask" (bool HxW), "polygons" ([{"x": [...], "y": [...]}],
    normalised), "source": "segment head"}`, or None for a region the head does not know.

    `tokens_or_image`: the image's frozen tokens ((n, d) or (1, n, d), as the VLM reads them), or an HxW [0, 1]
    array / a path, encoded by `encoder` (the VLM's frozen encoder). `size`: the mask's (H, W); default the image's
    size, or 256 for tokens."""
    if isinstance(tokens_or_image, torch.Tensor):
        tokens = tokens_or_image
    else:
        if encoder is None:
            raise ValueError("segment: an image needs the encoder that made the head's tokens")
        from generation.model.encoders import encode_visual
        from retrieval.data.image_io import read_image

        image = tokens_or_image if isinstance(tokens_or_image, np.ndarray) else read_image(tokens_or_image)
        size = size or image.shape
        tokens, _, _ = encode_visual([encoder], [image], on_error="raise")
    masks = head.segment(head.features(tokens), region, size or 256)
    if masks is None:
        return None
    name = head.names[head.region(region)]
    return {"region": name, "mask": masks[0], "polygons": mask_to_polygons(masks[0]), "source": "segment head"}


def answer_json(answer: Mapping[str, Any], dense: bool = True) -> dict:
    """A `segment` answer as JSON-ready data: the region, the polygons, the mask as COCO RLE
    (`retrieval.data.region_masks.decode_rle` reads it) and, with `dense`, as a binary array (rows of 0/1)."""
    mask = np.asarray(answer["mask"], dtype=bool)
    dense_mask = {"mask": mask.astype(np.uint8).tolist()} if dense else {}
    return {
        "region": answer["region"],
        "polygons": answer["polygons"],
        **dense_mask,
        "rle": encode_rle(mask),
        "source": answer["source"],
    }


def segment_record(head: SegmentHead | None, tokens: torch.Tensor, region: str, size: tuple[int, ...]) -> dict:
    """`cxr generate --task segment` / the API's answer for one image's tokens: the region, its polygons and COCO
    RLE at the image's `size` (no dense mask: `decode_rle` rebuilds it), a one-line summary as `text`. A folder
    without a head, or a region the head does not know, is a usage error naming what there is."""
    from retrieval.errors import UsageError

    if head is None:
        raise UsageError("this VLM folder has no segment head: train it on a manifest with a masks column")
    answer = segment(head, tokens, region, tuple(size[:2]))
    if answer is None:
        raise UsageError(f"the segment head knows no region {region!r}; it knows: {', '.join(head.names)}")
    data = answer_json(answer, dense=False)  # the RLE alone: an H x W list of 0/1 per request would be dropped
    share = float(np.asarray(answer["mask"], dtype=bool).mean())
    text = f"{data['region']}: {len(data['polygons'])} polygon(s) covering {share:.1%} of the image"
    return {"task": "segment", "prompt": region, "text": text, **data, "exemplars": [], "copied": []}
