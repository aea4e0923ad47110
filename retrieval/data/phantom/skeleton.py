"""Bones and the last soft-tissue touches: spine, posterior and anterior ribs, clavicles, the gastric bubble and
breast shadows, each added to the density map `D` in place in the phantom's drawing order."""

from __future__ import annotations

import math

import numpy as np

from retrieval.data.phantom.anatomy import Anatomy
from retrieval.data.phantom.geometry import band, ellipse, sig
from retrieval.data.phantom.parse import Finding

N_RIBS = 10
RibPaths = dict[tuple[str, int], tuple[np.ndarray, np.ndarray]]


def spine(D, X, Y, A: Anatomy, findings: list[Finding], eps: float) -> np.ndarray:
    """The vertebral column (bent by scoliosis); returns its centre line x for every pixel."""
    scol = next((f for f in findings if f.name == "Scoliosis"), None)
    sx = A.m + (
        0.035 * scol.severity * np.sin(np.pi * (Y - 0.1) / 0.75) * (1 if scol.side != "left" else -1) if scol else 0.0
    )
    column = sig(0.034 - np.abs(X - sx), eps) * sig(Y - 0.02, 0.01)
    # vertebral bodies with disc spaces, computed only in the image columns the spine covers: elsewhere both
    # terms below are 0 whatever `discs` holds (and a float32 power of negative bases is slow: ~6 ms at 192 px)
    discs = np.ones_like(column)
    cols = np.flatnonzero(column.any(axis=0))
    if len(cols):
        win = slice(int(cols[0]), int(cols[-1]) + 1)
        discs[:, win] = 0.75 + 0.25 * np.cos(2 * np.pi * (Y[:, win] - A.ya) / 0.05) ** 8
    pedicles = sum(sig(0.006 - np.abs(X - sx - sg * 0.022), eps) for sg in (-1, 1)) * (discs > 0.9)
    D += 0.22 * column * discs + 0.1 * pedicles * column
    A.masks["spine"] = column
    return sx


def rib_paths(A: Anatomy) -> RibPaths:
    """The centre line of every posterior rib, keyed by (side, k) from the top (the rib fracture drawer uses it)."""
    rib_gap = (max(A.yb) - A.ya) / (N_RIBS - 0.3)
    rib_len = A.wl * 2.15
    paths: RibPaths = {}
    uu = np.linspace(0.03, 0.03 + rib_len, 12)
    w = uu / rib_len
    for side, sg in (("right", -1), ("left", 1)):
        for k in range(N_RIBS):
            paths[(side, k)] = (A.m + sg * uu, A.ya + 0.01 + k * rib_gap - 0.035 * np.sin(np.pi * w) + 0.075 * w**2)
    return paths


def ribs(D, X, Y, A: Anatomy, sx, body, eps: float) -> None:
    """Posterior ribs, then the fainter anterior ribs, inside the body."""
    rib_gap = (max(A.yb) - A.ya) / (N_RIBS - 0.3)
    rib_len = A.wl * 2.15
    # All posterior ribs share one shape y = y0_k + g(u), u = |x - spine|, so the distance to the nearest rib is
    # closed-form: the vertical offset to the nearest y0_k, scaled by the curve's slope (no distance transform).
    uX = np.abs(X - sx)
    w = uX / rib_len
    g = -0.035 * np.sin(np.pi * w) + 0.075 * w**2
    dg = (-0.035 * np.pi * np.cos(np.pi * w) + 0.15 * w) / rib_len
    phase = (Y - g - A.ya - 0.01) / rib_gap
    kk = np.clip(np.rint(phase), 0, N_RIBS - 1)
    d = np.abs(phase - kk) * rib_gap / np.sqrt(1 + dg * dg)
    along = sig(uX - 0.03, eps) * sig(0.03 + rib_len - uX, 0.01)
    th = 0.0105
    out = (0.08 * sig(th - d, eps) + 0.06 * sig(th * 0.3 - np.abs(d - th * 0.8), eps)) * along
    # anterior ribs (fainter): straight, running down and medially from the lateral wall
    ua0, ua1 = A.wl * 0.8, A.wl * 2.1
    slope = 0.12 / (A.wl * 1.3)
    pa = (Y - (A.ya + 0.01 + 0.03 + 0.12) - slope * (uX - ua0)) / rib_gap
    ka = np.clip(np.rint(pa), 0, 6)
    da = np.abs(pa - ka) * rib_gap / math.sqrt(1 + slope * slope)
    out += 0.04 * sig(th * 1.1 - da, eps) * sig(uX - ua0, 0.01) * sig(ua1 - uX, 0.01)
    out *= body
    D += out
    A.masks["ribs"] = out


def clavicles(D, rng: np.random.Generator, X, Y, A: Anatomy, eps: float) -> None:
    """Both clavicles (masks `right_clavicle`, `left_clavicle`)."""
    for side, sg in (("right", -1), ("left", 1)):
        uu = np.linspace(0.035, 0.27, 10)
        cy0 = A.ya + rng.uniform(0.04, 0.07)
        xs = A.m + sg * uu
        ys = cy0 - 0.08 * (uu - 0.035) / 0.235 + 0.015 * np.sin(2 * np.pi * uu / 0.235)
        A.masks[f"{side}_clavicle"] = band(X, Y, xs, ys, 0.011, eps)
        D += 0.25 * A.masks[f"{side}_clavicle"]


def gastric_bubble_and_breasts(D, rng: np.random.Generator, X, Y, A: Anatomy, eps: float) -> None:
    """The gastric bubble under the left dome; breast shadows for some patients."""
    S = X.shape[0]
    gx = A.m + 0.15 + rng.uniform(-0.03, 0.03)
    gy = A.masks["left_ydiaphragm"][min(S - 1, int(A.yb[1] * S)), min(S - 1, int(gx * S))] + 0.045
    D -= 0.35 * ellipse(X, Y, gx, gy, 0.045, 0.025, eps) * sig(Y - gy + 0.005, 0.003)
    if rng.random() < 0.45:
        for sg in (-1, 1):
            D += 0.12 * ellipse(X, Y, A.m + sg * 0.24, A.base - 0.08, 0.13, 0.09, 0.02) * sig(Y - (A.base - 0.1), 0.02)
