"""Focal lesions: nodule, mass (lobulated), calcified granuloma (tiny and dense), cavity (a ring), and calcified
hilar lymph nodes."""

from __future__ import annotations

import numpy as np

from retrieval.data.phantom.context import DrawContext, drawer, point_in_lung, side_index
from retrieval.data.phantom.geometry import ellipse, smooth_noise
from retrieval.data.phantom.parse import Finding


def _radius_and_density(name: str, severity: float, S: int) -> tuple[float, float]:
    if name == "Nodule":
        return 0.016 + 0.006 * severity, 0.45
    if name == "Mass":
        return 0.045 + 0.02 * severity, 0.5
    if name == "Cavity":
        return 0.04, 0.5
    return max(0.008, 2.3 / S), 1.3  # a calcified granuloma


@drawer("Nodule", "Mass", "Calcified Granuloma", "Cavity", per_side=True)
def lesion(f: Finding, rng: np.random.Generator, ctx: DrawContext, side: str) -> np.ndarray:
    """A round lesion somewhere in the named zone: lobulated when a mass, hollow when a cavity."""
    X, Y, eps, S = ctx.X, ctx.Y, ctx.eps, ctx.size
    cx, cy = point_in_lung(rng, ctx, side, f.zone if f.name != "Cavity" else (f.zone or "upper"))
    rr, dens = _radius_and_density(f.name, f.severity, S)
    lob = 1 + (0.12 * smooth_noise(rng, X.shape, S / 60) if f.name == "Mass" else 0)
    o = ellipse(X, Y, cx, cy, rr, rr * rng.uniform(0.85, 1.0), eps) * lob
    if f.name == "Cavity":
        o = np.clip(o - 0.85 * ellipse(X, Y, cx + 0.005, cy - 0.004, rr * 0.55, rr * 0.5, eps), 0, None)
    pad = 2.0 / S  # the blur spreads small findings by a pixel or two
    ctx.mark(f.name, ellipse(X, Y, cx, cy, rr + pad, rr + pad, eps), 0.5)
    return dens * np.clip(o, 0, 1.3)


@drawer("Calcified Lymph Nodes", per_side=True)
def calcified_lymph_nodes(f: Finding, rng: np.random.Generator, ctx: DrawContext, side: str) -> np.ndarray:
    """Two or three dense nodes at the hilum."""
    X, Y, A, eps = ctx.X, ctx.Y, ctx.anatomy, ctx.eps
    _, sg = side_index(side)
    hx, hy = 0.5 + sg * 0.085, A.heart[1] - A.heart[3] * 1.05
    o = np.zeros_like(X)
    for _ in range(2 + rng.integers(2)):
        o = np.maximum(o, ellipse(X, Y, hx + rng.normal(0, 0.012), hy + rng.normal(0, 0.015), 0.009, 0.008, eps))
    ctx.mark(f.name, o, 0.4)
    return 1.0 * o
