"""Pleural findings: effusion (a meniscus and a blunted angle), pneumothorax (a retracted lung edge) and pleural
thickening (a rim along the chest wall). Each drawer draws one side."""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from retrieval.data.phantom.context import DrawContext, drawer, side_index, zone_range
from retrieval.data.phantom.geometry import sig
from retrieval.data.phantom.parse import Finding


@drawer("Pleural Effusion", per_side=True)
def pleural_effusion(f: Finding, rng: np.random.Generator, ctx: DrawContext, side: str) -> np.ndarray:
    """Fluid up to a meniscus that rises toward the lateral wall, and a blunted costophrenic angle."""
    X, Y, A = ctx.X, ctx.Y, ctx.anatomy
    i, sg = side_index(side)
    lung = ctx.lungs[side]
    h = 0.06 + 0.1 * f.severity**1.6  # fluid height at the lateral wall
    level = A.yb[i] - h
    xc = 0.5 + sg * (0.03 + A.wl)
    lat = np.clip((X - xc) * sg / A.wl + 1, 0, 2) / 2  # 0 medial .. 1 lateral
    meniscus = level + 0.07 * f.severity * (1 - lat) ** 1.5
    fluid = lung * sig(Y - meniscus, 0.012) * (0.75 + 0.25 * np.clip((Y - meniscus) / 0.05, 0, 1))
    # blunt the angle: fill the costophrenic recess
    recess = sig(Y - (A.yb[i] - 0.02 - h * 0.5), 0.01) * sig(0.05 - np.abs((X - xc) * sg - A.wl), 0.01)
    fl = np.clip(fluid + 0.6 * recess * (lung > 0.05), 0, 1)
    ctx.lung_vessels *= 1 - fl
    ctx.mark(f.name, fl, 0.3)
    return 0.72 * fl


@drawer("Pneumothorax", per_side=True, default="right")
def pneumothorax(f: Finding, rng: np.random.Generator, ctx: DrawContext, side: str) -> np.ndarray:
    """Air between the chest wall and the retracted lung edge, which shows as a thin pleural line."""
    X, Y, A, eps = ctx.X, ctx.Y, ctx.anatomy, ctx.eps
    i, sg = side_index(side)
    lung = ctx.lungs[side]
    xc = 0.5 + sg * (0.03 + A.wl)
    gap = 0.03 + 0.05 * f.severity  # lung edge retracts from the chest wall
    t = np.clip((Y - A.ya) / (A.yb[i] - A.ya), 0, 1)
    lat_w = A.wl * (0.25 + 0.78 * t**0.42)
    edge = lat_w - gap * (1.2 - 0.7 * t) - 0.05 * (Y < A.ya + 0.05)
    d = (X - xc) * sg
    space = lung * sig(d - edge, eps) * sig(A.yb[i] - 0.1 - Y, 0.03)
    # apex: also retracted downward
    space = np.maximum(space, lung * sig(A.ya + gap * 1.3 - Y, eps))
    line = lung * sig(0.0035 - np.abs(d - edge), eps * 0.7) * (Y < A.yb[i] - 0.1) * (Y > A.ya + gap * 1.2)
    ctx.lung_vessels *= 1 - space
    ctx.mark(f.name, space, 0.5)
    return -0.16 * space + 0.28 * line


def _random_side(rng: np.random.Generator) -> str:
    return "right" if rng.random() < 0.5 else "left"


@drawer("Pleural Thickening", per_side=True, default=_random_side)
def pleural_thickening(f: Finding, rng: np.random.Generator, ctx: DrawContext, side: str) -> np.ndarray:
    """A rim along the chest wall: at the apex (an apical cap) unless the report names another zone."""
    Y, A = ctx.Y, ctx.anatomy
    i, _ = side_index(side)
    lung = ctx.lungs[side]
    inner = ndimage.binary_erosion(lung > 0.5, iterations=max(1, int(0.014 * ctx.size)))
    rim = (lung > 0.5) & ~inner
    apical = f.zone == "upper" or "apical" in f.text or f.zone is None
    y0, y1 = zone_range(f.zone, A, i)
    zone = Y < A.ya + 0.1 if apical else (Y > y0) & (Y < y1 + 0.1)
    o = ndimage.gaussian_filter((rim & zone).astype(np.float32), 0.8)
    ctx.mark(f.name, o, 0.3)
    return 0.45 * o
