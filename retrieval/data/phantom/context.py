"""What a finding drawer sees (`DrawContext`), the registry of drawers, and the placement helpers they share.

A drawer is `draw(f, rng, ctx) -> density | None`: it marks the finding's region(s) with `ctx.mark` (a box in
`ctx.boxes` and the same pixels in `ctx.masks`, so a finding's mask and box always agree), may dim
`ctx.lung_vessels` in place, and returns the density it adds (None when the finding is drawn by the anatomy's
geometry, e.g. cardiomegaly). `rng` is the finding's own random stream. Register one with `@drawer("Name", ...)`;
most findings are drawn on one lung or both, so their drawers draw one side (`@drawer("Name", per_side=True)`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from scipy import ndimage

from retrieval.data.phantom.anatomy import Anatomy
from retrieval.data.phantom.geometry import add_box
from retrieval.data.phantom.parse import Finding
from retrieval.data.phantom.skeleton import RibPaths


@dataclass
class DrawContext:
    """The drawn chest a finding is placed on: the grid, the soft-edge width, the anatomy and its masks, each
    lung's mask, the rib centre lines, the lung vessel markings (dimmed in place by findings that hide them) and
    the finding boxes drawn so far and each finding's mask (bool HxW, the union over its sides), by name."""

    X: np.ndarray
    Y: np.ndarray
    eps: float
    anatomy: Anatomy
    lungs: dict[str, np.ndarray]
    rib_paths: RibPaths
    lung_vessels: np.ndarray
    boxes: list[dict[str, Any]] = field(default_factory=list)
    masks: dict[str, np.ndarray] = field(default_factory=dict)

    @property
    def size(self) -> int:
        return self.X.shape[0]

    def mark(self, name: str, mask: np.ndarray, thr: float = 0.25) -> None:
        """Record a drawn region of finding `name`: the pixels of mask > thr * max go into `masks[name]` (or'ed
        with the region drawn before on another side) and their box into `boxes` (`geometry.add_box`, so the box
        is the mask's bounding box). Nothing when the mask is empty."""
        add_box(self.boxes, name, mask, thr)
        m = float(mask.max())
        if m <= 1e-6:
            return
        on = mask > thr * m
        if not on.any():
            return
        self.masks[name] = self.masks[name] | on if name in self.masks else on


Drawer = Callable[[Finding, np.random.Generator, DrawContext], "np.ndarray | None"]
SideDrawer = Callable[[Finding, np.random.Generator, DrawContext, str], np.ndarray]
DRAWERS: dict[str, Drawer] = {}


def drawer(*names: str, per_side: bool = False, default: Callable[[np.random.Generator], str] | str | None = None):
    """Register the decorated function as the drawer of the findings `names`.

    With `per_side`, the function draws one side, `draw(f, rng, ctx, side) -> density`, and the registered drawer
    sums it over the sides the finding is on (`sides(f, rng, default)`; a callable `default` is called with the
    finding's stream first)."""

    def register(fn):
        draw = _summed_over_sides(fn, default) if per_side else fn
        for name in names:
            DRAWERS[name] = draw
        return fn

    return register


def _summed_over_sides(draw_side: SideDrawer, default) -> Drawer:
    def draw(f: Finding, rng: np.random.Generator, ctx: DrawContext) -> np.ndarray:
        out = np.zeros_like(ctx.X)
        for side in sides(f, rng, default(rng) if callable(default) else default):
            out += draw_side(f, rng, ctx, side)
        return out

    return draw


def sides(f: Finding, rng: np.random.Generator, default: str | None = None) -> list[str]:
    """The sides to draw `f` on: both when bilateral, its own side, else `default` or a random one."""
    if f.side == "bilateral":
        return ["right", "left"]
    if f.side in ("right", "left"):
        return [f.side]
    return [default or ("right" if rng.random() < 0.5 else "left")]


def side_index(side: str) -> tuple[int, int]:
    """(index into the per-side anatomy tuples, sign of the image x direction toward that side)."""
    return (0, -1) if side == "right" else (1, 1)


def zone_range(zone: str | None, A: Anatomy, i: int) -> tuple[float, float]:
    """The y range of a lung zone on side `i` (None: most of the lung)."""
    top, bot = A.ya, A.yb[i] - A.dome[i] * 0.4
    h = bot - top
    return {
        "upper": (top + 0.05 * h, top + 0.35 * h),
        "mid": (top + 0.35 * h, top + 0.65 * h),
        "lower": (top + 0.62 * h, bot),
        None: (top + 0.3 * h, top + 0.85 * h),
    }[zone]


def point_in_lung(rng: np.random.Generator, ctx: DrawContext, side: str, zone: str | None) -> tuple[float, float]:
    """A random point well inside `side` lung within `zone`."""
    i = 0 if side == "right" else 1
    y0, y1 = zone_range(zone, ctx.anatomy, i)
    mask = ctx.lungs[side] > 0.95
    sel = mask & (ctx.Y >= y0) & (ctx.Y <= y1)
    sel = ndimage.binary_erosion(sel, iterations=max(1, mask.shape[0] // 40))
    ys, xs = np.nonzero(sel)
    if len(xs) == 0:
        ys, xs = np.nonzero(mask)
    j = rng.integers(len(xs))
    return float(ctx.X[ys[j], xs[j]]), float(ctx.Y[ys[j], xs[j]])
