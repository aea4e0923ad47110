"""Region masks: how they are stored, drawn as polygons, resized and scored.

A region mask is a bool HxW array (the phantom's lungs, heart and drawn findings; a segmentation answer).
- Stored as COCO run-length encoding (pycocotools: `{"size": [h, w], "counts": str}`), one per region name, in the
  manifest's `masks` column as one JSON object per row (`masks_to_json` / `masks_from_json`): exact and compact
  (a lung at 256 px takes a few hundred bytes).
- Polygons, for answers a reader or a viewer draws: `mask_to_polygons` traces the region's outlines
  (skimage `find_contours` at 0.5 on the zero-padded mask, simplified by `approximate_polygon`), as `{"x": [...],
  "y": [...]}` normalised to [0, 1] (pixel centres at (i + 0.5) / size); `polygons_to_mask` fills them back with
  the even-odd rule (skimage `polygon2mask`, xor-ed), so a hole traced inside an outline stays a hole.
- Scores: `iou` and `dice` (both 1.0 when both masks are empty); `resize_mask` to another size (area-averaged
  down, bilinear up, as a float fraction of the region per pixel).
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

POLYGON_TOLERANCE = 0.5  # pixels a simplified outline may stray from the traced one


def encode_rle(mask: np.ndarray) -> dict[str, Any]:
    """A bool HxW mask -> COCO RLE `{"size": [h, w], "counts": str}` (JSON-ready)."""
    from pycocotools import mask as coco_mask

    rle = coco_mask.encode(np.asfortranarray(np.asarray(mask, dtype=np.uint8)))
    return {"size": [int(v) for v in rle["size"]], "counts": rle["counts"].decode("ascii")}


def decode_rle(rle: Mapping[str, Any]) -> np.ndarray:
    """COCO RLE (counts as str or bytes) -> bool HxW mask."""
    from pycocotools import mask as coco_mask

    counts = rle["counts"]
    raw = {"size": list(rle["size"]), "counts": counts.encode("ascii") if isinstance(counts, str) else counts}
    with warnings.catch_warnings():  # pycocotools' C extension trips numpy 2's `copy=` deprecation; harmless
        warnings.simplefilter("ignore", DeprecationWarning)
        return coco_mask.decode([raw])[:, :, 0].astype(bool)


def masks_to_json(masks: Mapping[str, np.ndarray]) -> str:
    """{region: bool mask} -> one JSON object of RLEs (the manifest's `masks` cell)."""
    return json.dumps({name: encode_rle(m) for name, m in masks.items()}, separators=(",", ":"))


def masks_from_json(text: str | None) -> dict[str, np.ndarray]:
    """A `masks` cell -> {region: bool mask} ({} for an empty or missing cell)."""
    if text is None or (isinstance(text, float) and np.isnan(text)) or not str(text).strip():
        return {}
    return {name: decode_rle(rle) for name, rle in json.loads(text).items()}


def mask_to_polygons(mask: np.ndarray, tolerance: float = POLYGON_TOLERANCE) -> list[dict[str, list[float]]]:
    """The outlines of a bool HxW mask as polygons `{"x": [...], "y": [...]}` normalised to [0, 1] (each closed:
    the last vertex repeats the first); [] for an empty mask."""
    from skimage.measure import approximate_polygon, find_contours

    m = np.asarray(mask, dtype=bool)
    h, w = m.shape
    out = []
    for contour in find_contours(np.pad(m, 1).astype(np.float32), 0.5):
        poly = approximate_polygon(contour, tolerance) - 1.0  # back from the padded grid
        if len(poly) < 4:  # a closed contour needs three distinct vertices
            continue
        xs = [round((c + 0.5) / w, 5) for c in poly[:, 1]]
        out.append({"x": xs, "y": [round((r + 0.5) / h, 5) for r in poly[:, 0]]})
    return out


def polygons_to_mask(polygons: Sequence[Mapping[str, Sequence[float]]], height: int, width: int) -> np.ndarray:
    """Fill normalised polygons (as `mask_to_polygons` writes them) into a bool `height` x `width` mask, even-odd."""
    from skimage.draw import polygon2mask

    out = np.zeros((height, width), dtype=bool)
    for p in polygons:
        rows = np.asarray(p["y"], dtype=np.float64) * height - 0.5
        cols = np.asarray(p["x"], dtype=np.float64) * width - 0.5
        out ^= polygon2mask((height, width), np.stack([rows, cols], axis=1))
    return out


def iou(a: np.ndarray, b: np.ndarray) -> float:
    """Intersection over union of two bool masks of one shape (1.0 when both are empty)."""
    a, b = np.asarray(a, dtype=bool), np.asarray(b, dtype=bool)
    union = int(np.count_nonzero(a | b))
    return 1.0 if union == 0 else int(np.count_nonzero(a & b)) / union


def dice(a: np.ndarray, b: np.ndarray) -> float:
    """Dice coefficient 2|A n B| / (|A| + |B|) of two bool masks of one shape (1.0 when both are empty)."""
    a, b = np.asarray(a, dtype=bool), np.asarray(b, dtype=bool)
    total = int(np.count_nonzero(a)) + int(np.count_nonzero(b))
    return 1.0 if total == 0 else 2 * int(np.count_nonzero(a & b)) / total


def resize_mask(mask: np.ndarray, size: int | tuple[int, int]) -> np.ndarray:
    """A mask (bool or float HxW, or (B, H, W)) at `size` as float32 in [0, 1]: area-averaged when shrinking (the
    share of each new pixel the region covers), bilinear when growing."""
    import torch
    import torch.nn.functional as F

    hw = (size, size) if isinstance(size, int) else tuple(size)
    x = torch.as_tensor(np.asarray(mask, dtype=np.float32))
    batched = x.ndim == 3
    x = x[:, None] if batched else x[None, None]
    shrink = hw[0] <= x.shape[-2] and hw[1] <= x.shape[-1]
    y = F.interpolate(x, size=hw, mode="area") if shrink else F.interpolate(x, size=hw, mode="bilinear")
    y = y[:, 0] if batched else y[0, 0]
    return y.clamp(0, 1).numpy()
