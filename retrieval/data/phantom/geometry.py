"""Drawing primitives on the normalised, rotated grid (X, Y in [0, 1], float32 HxW): soft steps, ellipses, bands
around polylines, smooth noise, boxes read off masks, and the per-purpose random streams."""

from __future__ import annotations

import math
import zlib
from typing import Any

import numpy as np
from scipy import ndimage


def stream(seed: int, *keys: Any) -> np.random.Generator:
    """A random stream of its own for (seed, keys): anatomy, vessels, noise and each finding draw from one each."""
    return np.random.default_rng([int(seed) & 0xFFFFFFFF] + [zlib.crc32(str(k).encode()) for k in keys])


def sig(z: np.ndarray, eps: float) -> np.ndarray:
    """A soft step from 0 to 1 over about 2*eps around z = 0 (a clipped ramp: cheap, and smooth enough)."""
    out = z * (0.5 / eps)
    out += 0.5  # in place: the same arithmetic as `clip(z * k + 0.5)` without two temporaries
    return np.clip(out, 0.0, 1.0, out=out)


def window(X: np.ndarray, Y: np.ndarray, x0: float, x1: float, y0: float, y1: float) -> tuple[slice, slice]:
    """Pixel slices covering the world rectangle [x0, x1] x [y0, y1] (plus one pixel)."""
    col, row = to_pixels(X, Y, np.array([x0, x1, x0, x1]), np.array([y0, y0, y1, y1]))
    S0, S1 = X.shape
    r0, r1 = max(0, int(np.floor(row.min())) - 1), min(S0, int(np.ceil(row.max())) + 2)
    c0, c1 = max(0, int(np.floor(col.min())) - 1), min(S1, int(np.ceil(col.max())) + 2)
    return slice(r0, max(r0, r1)), slice(c0, max(c0, c1))


def ellipse(X, Y, cx, cy, ax, ay, eps, angle=0.0) -> np.ndarray:
    """A filled ellipse with soft edges (computed only inside its bounding box)."""
    out = np.zeros(X.shape, np.float32)
    r = max(ax, ay) * 1.05 + 2 * eps
    rs, cs = window(X, Y, cx - r, cx + r, cy - r, cy + r)
    x, y = X[rs, cs] - np.float32(cx), Y[rs, cs] - np.float32(cy)
    c, s = np.float32(math.cos(angle)), np.float32(math.sin(angle))
    u = (x * c + y * s) * np.float32(1 / ax)
    v = (y * c - x * s) * np.float32(1 / ay)
    out[rs, cs] = sig(1.0 - np.sqrt(u * u + v * v), eps / max(min(ax, ay), 1e-3))
    return out


def to_pixels(X: np.ndarray, Y: np.ndarray, xs: np.ndarray, ys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Pixel (col, row) of world points: X and Y are affine in the pixel grid, so invert that 2x2 map."""
    x0, y0 = float(X[0, 0]), float(Y[0, 0])
    a, b = float(X[0, 1]) - x0, float(X[1, 0]) - x0
    c, d = float(Y[0, 1]) - y0, float(Y[1, 0]) - y0
    det = a * d - b * c
    dx, dy = np.asarray(xs, np.float64) - x0, np.asarray(ys, np.float64) - y0
    return (d * dx - b * dy) / det, (a * dy - c * dx) / det


def dist(X: np.ndarray, Y: np.ndarray, polylines: list[tuple[np.ndarray, np.ndarray]]) -> np.ndarray:
    """Distance (world units) from every pixel to the nearest of the polylines (one Euclidean distance
    transform for all of them, inside their bounding box plus a margin; 10 elsewhere)."""
    S0, S1 = X.shape
    px = float(np.hypot(X[0, 1] - X[0, 0], Y[0, 1] - Y[0, 0]))  # world units per pixel
    out = np.full((S0, S1), 10.0, np.float32)
    if not polylines:
        return out
    lens = [len(p[0]) for p in polylines]
    col, row = to_pixels(X, Y, np.concatenate([p[0] for p in polylines]), np.concatenate([p[1] for p in polylines]))
    steps = np.hypot(np.diff(col), np.diff(row))  # all at once; the steps between two polylines go unused
    cc_all, rr_all = [], []
    start = 0
    for n in lens:
        c, r = col[start : start + n], row[start : start + n]
        arc = np.concatenate([[0.0], np.cumsum(steps[start : start + n - 1])])
        start += n
        t = np.arange(0.0, arc[-1] + 0.34, 0.34)  # a third of a pixel apart
        cc_all.append(np.interp(t, arc, c))
        rr_all.append(np.interp(t, arc, r))
    cc = np.rint(np.concatenate(cc_all)).astype(int)
    rr = np.rint(np.concatenate(rr_all)).astype(int)
    ok = (cc >= 0) & (cc < S1) & (rr >= 0) & (rr < S0)
    if not ok.any():
        return out
    cc, rr = cc[ok], rr[ok]
    margin = max(8, S0 // 16)
    r0, r1 = max(0, rr.min() - margin), min(S0, rr.max() + margin + 1)
    c0, c1 = max(0, cc.min() - margin), min(S1, cc.max() + margin + 1)
    canvas = np.ones((r1 - r0, c1 - c0), bool)
    canvas[rr - r0, cc - c0] = False
    out[r0:r1, c0:c1] = ndimage.distance_transform_edt(canvas) * px
    return out


def band(X, Y, xs: np.ndarray, ys: np.ndarray, width: float, eps: float) -> np.ndarray:
    """A smooth band of half-width `width` (world units) around the polyline (xs, ys)."""
    return sig(width - dist(X, Y, [(np.asarray(xs), np.asarray(ys))]), eps)


def smooth_noise(rng: np.random.Generator, shape: tuple[int, int], sigma: float) -> np.ndarray:
    """Unit-variance noise smooth on the scale `sigma` pixels (drawn coarse, then resized up: fast)."""
    from PIL import Image

    step = max(1, int(sigma))
    small = (shape[0] // step + 2, shape[1] // step + 2)
    n = rng.standard_normal(small).astype(np.float32)
    if step > 1:
        n = ndimage.gaussian_filter(n, 0.7)
        up = np.asarray(Image.fromarray(n, mode="F").resize((small[1] * step, small[0] * step), Image.BILINEAR))
        up = up[: shape[0], : shape[1]]
    else:
        up = ndimage.gaussian_filter(n, sigma)[: shape[0], : shape[1]]
    return (up - up.mean()) / (up.std() + 1e-6)


def box_from(mask: np.ndarray, thr: float = 0.25, grow: int = 0) -> tuple[float, float, float, float] | None:
    """Normalised bounding box of mask > thr * max (None when empty), grown by `grow` pixels on each side within
    the image: the box of `ndimage.binary_dilation(on, iterations=grow)` (the cross moves each extreme one pixel
    out per step), without the dilation."""
    m = float(mask.max())
    if m <= 1e-6:
        return None
    on = mask > thr * m
    rows, cols = np.flatnonzero(on.any(1)), np.flatnonzero(on.any(0))
    if len(rows) == 0:
        return None
    h, w = mask.shape
    r0, r1 = max(0, rows[0] - grow), min(h - 1, rows[-1] + grow)
    c0, c1 = max(0, cols[0] - grow), min(w - 1, cols[-1] + grow)
    return (float(c0 / w), float(r0 / h), float((c1 + 1) / w), float((r1 + 1) / h))


def add_box(boxes: list[dict[str, Any]], name: str, mask: np.ndarray, thr: float = 0.25, grow: int = 0) -> None:
    """Append the box of mask > thr * max (`box_from`), labelled `name`, rounded to 4 decimals (nothing when
    empty)."""
    b = box_from(mask, thr, grow)
    if b is not None and b[2] > b[0] and b[3] > b[1]:
        boxes.append(
            {
                "label": name,
                "x1": round(b[0], 4),
                "y1": round(b[1], 4),
                "x2": round(b[2], 4),
                "y2": round(b[3], 4),
            }
        )
