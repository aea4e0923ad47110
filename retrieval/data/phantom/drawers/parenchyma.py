"""Findings in the lung tissue: edema (perihilar haze), interstitial markings (reticulation), scarring and plate
atelectasis (thin bands), lobar atelectasis (a dense wedge), consolidation and opacity (textured blobs). Each
drawer draws one side."""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from retrieval.data.phantom.context import DrawContext, drawer, point_in_lung, side_index, zone_range
from retrieval.data.phantom.geometry import band, smooth_noise
from retrieval.data.phantom.parse import Finding


@drawer("Edema", per_side=True, default="right")
def edema(f: Finding, rng: np.random.Generator, ctx: DrawContext, side: str) -> np.ndarray:
    """A perihilar haze in which the vessels go indistinct."""
    X, Y, A = ctx.X, ctx.Y, ctx.anatomy
    lung = ctx.lungs[side]
    _, sg = side_index(side)
    hx, hy = 0.5 + sg * 0.14, A.heart[1] - A.heart[3] * 0.7
    haze = np.exp(-(((X - hx) / (0.11 + 0.03 * f.severity)) ** 2 + ((Y - hy) / 0.16) ** 2))
    tex = 0.8 + 0.2 * smooth_noise(rng, X.shape, ctx.size / 80)
    o = lung * haze * tex
    w_h = np.clip(o * 1.5, 0, 1)  # vessels go indistinct inside the haze only
    vessels = ctx.lung_vessels
    vessels[:] = vessels * (1 - w_h) + ndimage.gaussian_filter(vessels, 1.2) * w_h
    ctx.mark(f.name, o, 0.35)
    return 0.4 * (0.7 + 0.3 * f.severity) * o


@drawer("Interstitial Markings", per_side=True)
def interstitial_markings(f: Finding, rng: np.random.Generator, ctx: DrawContext, side: str) -> np.ndarray:
    """A network of thin curved lines in one zone (the lower one unless the report names another)."""
    X, Y, A, S = ctx.X, ctx.Y, ctx.anatomy, ctx.size
    lung = ctx.lungs[side]
    i, _ = side_index(side)
    y0, y1 = zone_range(f.zone or "lower", A, i)
    yc, hh = (y0 + y1) / 2 + 0.02, (y1 - y0) / 2 + 0.04
    zmask = lung * np.exp(-(((Y - yc) / hh) ** 4))
    # the zero crossings of smooth noise form a network of thin curved lines (reticulation)
    n1, n2 = smooth_noise(rng, X.shape, S / 36), smooth_noise(rng, X.shape, S / 24)
    ret = np.maximum(np.exp(-((n1 / 0.22) ** 2)), 0.7 * np.exp(-((n2 / 0.2) ** 2)))
    ctx.mark(f.name, zmask, 0.5)
    return 0.2 * (zmask * ret)


def _plate(f: Finding, rng: np.random.Generator, ctx: DrawContext, lung, cx: float, cy: float) -> np.ndarray:
    """A linear / plate-like band through (cx, cy), roughly horizontal (a scar or plate atelectasis)."""
    L = 0.06 + 0.04 * rng.random() * f.severity
    th = 0.006 if f.name == "Scarring" else 0.009
    a = rng.normal(0, 0.25)
    xs = np.array([cx - L, cx, cx + L])
    ys = np.array([cy - L * np.sin(a), cy + rng.normal(0, 0.006), cy + L * np.sin(a)])
    o = band(ctx.X, ctx.Y, xs, ys, th, ctx.eps) * lung
    if f.name == "Atelectasis" and f.zone in (None, "lower") and rng.random() < 0.5:
        o = np.maximum(o, band(ctx.X, ctx.Y, xs, ys + 0.025, th * 0.8, ctx.eps) * lung)
    return o


def _wedge(ctx: DrawContext, lung, sg: int, cx: float, cy: float) -> np.ndarray:
    """Lobar atelectasis: a dense wedge with volume loss toward the hilum."""
    X, Y, A = ctx.X, ctx.Y, ctx.anatomy
    hx, hy = 0.5 + sg * 0.08, A.heart[1] - A.heart[3]
    wedge = np.exp(-(((X - cx) / 0.09) ** 2 + ((Y - cy) / 0.07) ** 2))
    towards = np.exp(-(((X - (cx + hx) / 2) / 0.08) ** 2 + ((Y - (cy + hy) / 2) / 0.05) ** 2))
    return lung * np.clip(wedge + 0.6 * towards, 0, 1)


@drawer("Scarring", "Atelectasis", per_side=True)
def band_or_wedge(f: Finding, rng: np.random.Generator, ctx: DrawContext, side: str) -> np.ndarray:
    """Scarring and plate atelectasis as a thin band, large (lobar) atelectasis as a wedge."""
    lung = ctx.lungs[side]
    _, sg = side_index(side)
    cx, cy = point_in_lung(rng, ctx, side, f.zone)
    if f.name == "Scarring" or f.severity < 1.4:
        o = _plate(f, rng, ctx, lung, cx, cy)
        ctx.mark(f.name, o, 0.3)
    else:
        o = _wedge(ctx, lung, sg, cx, cy)
        ctx.mark(f.name, o, 0.35)
    return 0.5 * o


def _blobs(f: Finding, rng: np.random.Generator, ctx: DrawContext, cx: float, cy: float, r: float) -> np.ndarray:
    """The union of 4-7 soft elliptical blobs scattered around (cx, cy)."""
    X, Y = ctx.X, ctx.Y
    o = np.zeros_like(X)
    for _ in range(4 + int(3 * f.severity)):
        bx, by = cx + rng.normal(0, r * 0.6), cy + rng.normal(0, r * 0.5)
        o = np.maximum(
            o,
            np.exp(-(((X - bx) / (r * rng.uniform(0.6, 1.1))) ** 2 + ((Y - by) / (r * rng.uniform(0.5, 0.9))) ** 2)),
        )
    return o


@drawer("Consolidation", "Opacity", per_side=True)
def consolidation(f: Finding, rng: np.random.Generator, ctx: DrawContext, side: str) -> np.ndarray:
    """A cluster of soft blobs with texture, with air bronchograms when dense."""
    X, Y, eps = ctx.X, ctx.Y, ctx.eps
    lung = ctx.lungs[side]
    _, sg = side_index(side)
    cx, cy = point_in_lung(rng, ctx, side, f.zone)
    r = (0.045 if f.name == "Opacity" else 0.06) * (0.7 + 0.45 * f.severity)
    o = _blobs(f, rng, ctx, cx, cy, r)
    tex = np.clip(0.75 + 0.35 * smooth_noise(rng, X.shape, ctx.size / 64), 0, 1.2)
    o = lung * np.clip(o * 1.3, 0, 1) * tex
    if f.name == "Consolidation" and f.severity >= 1.0:
        xs, ys = np.array([cx - sg * r, cx + sg * r * 0.8]), np.array([cy - r * 0.2, cy + r * 0.4])
        o *= 1 - 0.35 * band(X, Y, xs, ys, 0.004, eps)
    ctx.lung_vessels *= 1 - 0.5 * np.clip(o, 0, 1)
    ctx.mark(f.name, o, 0.3)
    return (0.55 if f.name == "Consolidation" else 0.42) * o
