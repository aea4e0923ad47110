"""Support devices: very dense and thin. Pacemaker with leads, central line, endotracheal and enteric tubes,
sternotomy wires, surgical clips."""

from __future__ import annotations

import numpy as np

from retrieval.data.phantom.context import DrawContext, drawer, side_index, sides
from retrieval.data.phantom.geometry import band, ellipse, sig
from retrieval.data.phantom.parse import Finding


def _add(ctx: DrawContext, f: Finding, density: float, o: np.ndarray) -> np.ndarray:
    """The density `density * o` of a device drawn as the mask `o`, boxed."""
    out = np.zeros_like(ctx.X)
    out += density * o
    ctx.mark(f.name, o, 0.3)
    return out


@drawer("Pacemaker")
def pacemaker(f: Finding, rng: np.random.Generator, ctx: DrawContext) -> np.ndarray:
    """A generator below the clavicle (left unless the report says right) and one or two leads into the heart."""
    X, Y, A, eps = ctx.X, ctx.Y, ctx.anatomy, ctx.eps
    _, sg = side_index("left" if f.side != "right" else "right")
    gx, gy = 0.5 + sg * rng.uniform(0.2, 0.26), A.ya + rng.uniform(0.06, 0.1)
    box = sig(0.03 - np.abs(X - gx), eps) * sig(0.022 - np.abs(Y - gy), eps)
    hx, hy = A.heart[0], A.heart[1]
    leads = np.zeros_like(X)
    for tgt in ((hx - 0.02, hy + 0.02), (hx + 0.04, hy + 0.06))[: 1 + int(rng.random() < 0.7)]:
        xs = np.array([gx, gx - sg * 0.06, 0.5 - 0.02, 0.5 - 0.03, tgt[0], tgt[0] + 0.01])
        ys = np.array([gy, gy - 0.03, A.ya + 0.12, hy - 0.12, tgt[1] - 0.03, tgt[1]])
        leads = np.maximum(leads, band(X, Y, xs, ys, 0.0035, eps))
    return _add(ctx, f, 1.6, np.clip(box * 1.0 + leads, 0, 1))


@drawer("Central Line")
def central_line(f: Finding, rng: np.random.Generator, ctx: DrawContext) -> np.ndarray:
    """A subclavian line (right unless the report says left) ending in the superior vena cava."""
    A = ctx.anatomy
    _, sg = side_index("right" if f.side != "left" else "left")
    xs = np.array([0.5 + sg * 0.33, 0.5 + sg * 0.2, 0.5 + sg * 0.06, 0.5 + sg * 0.035, 0.5 - 0.025])
    ys = np.array([A.ya + 0.03, A.ya + 0.05, A.ya + 0.08, A.ya + 0.14, A.heart[1] - A.heart[3] - 0.02])
    return _add(ctx, f, 1.2, band(ctx.X, ctx.Y, xs, ys, 0.004, ctx.eps))


@drawer("Endotracheal Tube")
def endotracheal_tube(f: Finding, rng: np.random.Generator, ctx: DrawContext) -> np.ndarray:
    X, Y, eps = ctx.X, ctx.Y, ctx.eps
    xs = np.array([0.5, 0.5, 0.5 - 0.002])
    ys = np.array([0.0, 0.15, 0.27])
    return _add(ctx, f, 1.0, band(X, Y, xs - 0.009, ys, 0.003, eps) + band(X, Y, xs + 0.009, ys, 0.003, eps))


@drawer("Enteric Tube")
def enteric_tube(f: Finding, rng: np.random.Generator, ctx: DrawContext) -> np.ndarray:
    gy = ctx.anatomy.yb[1] + 0.03
    xs = np.array([0.49, 0.495, 0.5 + 0.01, 0.5 + 0.06, 0.5 + 0.14])
    ys = np.array([0.0, 0.3, 0.6, gy, gy + 0.04])
    return _add(ctx, f, 1.1, band(ctx.X, ctx.Y, xs, ys, 0.004, ctx.eps))


@drawer("Sternotomy Wires")
def sternotomy_wires(f: Finding, rng: np.random.Generator, ctx: DrawContext) -> np.ndarray:
    X, Y, eps = ctx.X, ctx.Y, ctx.eps
    o = np.zeros_like(X)
    top = ctx.anatomy.ya + 0.1
    for k in range(5 + int(rng.integers(2))):
        cy = top + k * 0.055
        ring = ellipse(X, Y, 0.5 + 0.005, cy, 0.012, 0.008, eps) - ellipse(X, Y, 0.5 + 0.005, cy, 0.007, 0.004, eps)
        o = np.maximum(o, np.clip(ring, 0, 1))
    return _add(ctx, f, 3.0, o)


@drawer("Surgical Clips")
def surgical_clips(f: Finding, rng: np.random.Generator, ctx: DrawContext) -> np.ndarray:
    X, Y, eps = ctx.X, ctx.Y, ctx.eps
    o = np.zeros_like(X)
    _, sg = side_index(sides(f, rng)[0])
    cx, cy = 0.5 + sg * rng.uniform(0.08, 0.25), rng.uniform(0.25, 0.8)
    for _ in range(3 + rng.integers(3)):
        px, py = cx + rng.normal(0, 0.02), cy + rng.normal(0, 0.02)
        a = rng.uniform(0, np.pi)
        xs, ys = np.array([px, px + 0.012 * np.cos(a)]), np.array([py, py + 0.012 * np.sin(a)])
        o = np.maximum(o, band(X, Y, xs, ys, 0.003, eps))
    return _add(ctx, f, 1.5, o)
