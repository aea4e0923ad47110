"""Bone findings: degenerative spine (osteophytes at disc spaces) and a healing rib fracture."""

from __future__ import annotations

import numpy as np

from retrieval.data.phantom.context import DrawContext, drawer
from retrieval.data.phantom.geometry import band, ellipse
from retrieval.data.phantom.parse import Finding


@drawer("Degenerative Spine")
def degenerative_spine(f: Finding, rng: np.random.Generator, ctx: DrawContext) -> np.ndarray:
    X, Y, A, eps = ctx.X, ctx.Y, ctx.anatomy, ctx.eps
    out = np.zeros_like(X)
    o = np.zeros_like(X)
    for _ in range(4 + rng.integers(4)):
        ly = rng.uniform(0.3, 0.8)
        ly = A.ya + round((ly - A.ya) / 0.05) * 0.05 + 0.025  # at a disc space
        for sg in (-1, 1):
            if rng.random() < 0.7:
                sxm = 0.5
                xs = np.array([sxm + sg * 0.03, sxm + sg * 0.048])
                ys = np.array([ly - 0.004, ly + 0.006 * rng.choice([-1, 1])])
                o = np.maximum(o, band(X, Y, xs, ys, 0.0045, eps))
    out += 1.4 * o
    ctx.mark(f.name, o, 0.3)
    return out


@drawer("Rib Fracture", per_side=True)
def rib_fracture(f: Finding, rng: np.random.Generator, ctx: DrawContext, side: str) -> np.ndarray:
    """A healing fracture: a bright callus on the rib around a thin lucent fracture line."""
    X, Y, eps = ctx.X, ctx.Y, ctx.eps
    k = int(rng.integers(3, 8))
    xs, ys = ctx.rib_paths[(side, k)]
    j = int(rng.integers(5, 9))
    px, py = xs[j], ys[j]
    on_rib = band(X, Y, xs, ys, 0.016, eps)
    callus = ellipse(X, Y, px, py, 0.016, 0.016, eps) * on_rib
    gap = ellipse(X, Y, px, py, 0.006, 0.02, eps) * band(X, Y, xs, ys, 0.01, eps)
    ctx.mark(f.name, ellipse(X, Y, px, py, 0.02, 0.02, eps), 0.5)
    return 0.42 * callus - 0.18 * gap
