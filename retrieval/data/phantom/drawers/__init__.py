"""One drawer per finding, registered by name in `retrieval.data.phantom.context.DRAWERS` when this package is
imported (one module per kind of finding)."""

from __future__ import annotations

import numpy as np

from retrieval.data.phantom.context import DRAWERS, DrawContext
from retrieval.data.phantom.drawers import bones, chest, devices, lesions, parenchyma, pleura  # noqa: F401
from retrieval.data.phantom.parse import Finding


def draw_finding(f: Finding, rng: np.random.Generator, ctx: DrawContext) -> np.ndarray | None:
    """Density added by one finding (None when drawn by geometry or unknown); appends its box(es) to `ctx.boxes`."""
    draw = DRAWERS.get(f.name)
    return None if draw is None else draw(f, rng, ctx)
