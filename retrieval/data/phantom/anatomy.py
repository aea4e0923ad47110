"""The patient: per-patient geometry and the soft tissue, lungs, vessels and mediastinum drawn into the density map.

Every function adds to the density map `D` in place (float32) in the order the phantom has always drawn them, so
the image stays byte-identical for a seed; the masks the findings and the anatomy boxes need go into `A.masks`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage

from retrieval.data.phantom.geometry import band, dist, ellipse, sig, stream
from retrieval.data.phantom.parse import Finding


@dataclass
class Anatomy:
    """Per-patient geometry (normalised units) and the drawn anatomy masks."""

    m: float  # midline x
    ya: float  # lung apex y
    yb: tuple[float, float]  # costophrenic angle y (right, left)
    dome: tuple[float, float]  # dome height (right, left)
    wl: float  # lateral half width of a lung
    heart: tuple[float, float, float, float]  # cx, cy, ax, ay
    base: float  # lung base y (before the per-side costophrenic offsets)
    habitus: float  # soft-tissue thickness
    hyper: float  # emphysema severity (0: none)
    low: float  # low-lung-volumes severity (0: none)
    masks: dict[str, np.ndarray] = field(default_factory=dict)


def severity(findings: list[Finding], name: str) -> float:
    """The severity of the first finding called `name` (0.0 when there is none)."""
    return next((f.severity for f in findings if f.name == name), 0.0)


def grid(rng: np.random.Generator, S: int) -> tuple[np.ndarray, np.ndarray]:
    """The patient's normalised coordinates X, Y (float32 SxS): rotated, shifted and zoomed per patient."""
    angle = float(np.deg2rad(rng.normal(0, 2.0)))
    shift = [float(v) for v in rng.normal(0, 0.012, 2)]
    zoom = rng.uniform(0.93, 1.05)
    yy, xx = np.mgrid[0:S, 0:S].astype(np.float32)
    u, v = (xx + 0.5) / S - 0.5 - shift[0], (yy + 0.5) / S - 0.5 - shift[1]
    c, s = np.cos(angle), np.sin(angle)
    X = ((c * u + s * v) / zoom + 0.5).astype(np.float32)
    Y = ((-s * u + c * v) / zoom + 0.5).astype(np.float32)
    return X, Y


def patient(rng: np.random.Generator, findings: list[Finding]) -> Anatomy:
    """Body habitus, lung heights and widths, diaphragm domes and the heart, changed by whole-chest findings."""
    habitus = rng.uniform(0.85, 1.2)
    m = 0.5
    hyper = severity(findings, "Emphysema")
    low = severity(findings, "Low Lung Volumes")
    ya = rng.uniform(0.08, 0.11) - 0.015 * (hyper > 0)
    base = rng.uniform(0.78, 0.83) + 0.05 * min(hyper, 1.2) - 0.06 * min(low, 1.2)
    yb = (base - rng.uniform(0.0, 0.02), base + rng.uniform(0.0, 0.015))
    dome_h = rng.uniform(0.06, 0.09) * (0.35 if hyper else 1.0)
    dome = [dome_h + 0.01, dome_h]
    for f in findings:
        if f.name == "Elevated Hemidiaphragm":
            i = 1 if f.side == "left" else 0
            dome[i] += 0.05 * f.severity
    wl = rng.uniform(0.165, 0.19) * (1.06 if hyper else 1.0)
    cm = severity(findings, "Cardiomegaly")
    heart_ax = rng.uniform(0.15, 0.17) * (1.0 + 0.28 * cm)
    heart_ay = rng.uniform(0.13, 0.145) * (1.0 + 0.1 * cm)
    heart = (m + 0.045 + 0.5 * (heart_ax - 0.16), base - 0.095 - 0.02 * (hyper > 0), heart_ax, heart_ay)
    return Anatomy(m, ya, yb, (dome[0], dome[1]), wl, heart, base, habitus, hyper, low)


def soft_tissue(D, rng, X, Y, A: Anatomy, eps: float) -> np.ndarray:
    """Body outline, soft tissue and the humeral heads; returns the body mask."""
    m = A.m
    shoulder = 0.1 + rng.uniform(-0.015, 0.015)
    bw = 0.30 + 0.16 * sig(Y - shoulder, 0.03) + 0.02 * A.habitus
    neck = 0.09 + 0.0 * Y
    bw = np.where(Y < shoulder - 0.02, np.maximum(neck, bw), bw)
    body = sig(bw - np.abs(X - m), eps * 2)
    D += (0.62 + 0.2 * A.habitus) * body
    # upper arms / humeral heads at the upper corners
    for sg in (-1, 1):
        D += 0.3 * ellipse(X, Y, m + sg * 0.44, 0.15, 0.045, 0.05, eps) * body
    return body


def lungs_and_liver(D, X, Y, A: Anatomy, body, eps: float) -> dict[str, np.ndarray]:
    """Each lung's mask (and its diaphragm line `<side>_ydiaphragm`), then the liver and spleen under the domes."""
    m, ya, yb, wl, heart = A.m, A.ya, A.yb, A.wl, A.heart
    lungs = {}
    for side, sg in (("right", -1), ("left", 1)):
        i = 0 if side == "right" else 1
        xc = m + sg * (0.03 + wl)  # lung centre x
        t = np.clip((Y - ya) / (yb[i] - ya), 0, 1)
        lat_w = wl * (0.25 + 0.78 * t**0.42)  # lateral edge distance from centre
        med_w = wl * (0.3 + 0.72 * t**0.55)
        if side == "left":
            med_w = med_w - 0.03 * sig(Y - (heart[1] - heart[3]), 0.02)
        dx = (X - xc) * sg  # positive towards the lateral side
        lateral_ok = sig(lat_w - dx, eps)
        medial_ok = sig(med_w + dx, eps)
        # diaphragm dome: highest near the lung centre, at yb at the lateral wall (the costophrenic angle)
        r = np.clip(((X - (xc - sg * 0.02)) / (wl * 1.05)) ** 2, 0, 1)
        y_d = yb[i] - A.dome[i] * (1 - r) ** 0.8
        below_top = sig(Y - ya, eps)
        above_diaphragm = sig(y_d - Y, eps)
        lungs[side] = lateral_ok * medial_ok * below_top * above_diaphragm
        A.masks[f"{side}_ydiaphragm"] = y_d
    # liver and spleen under the domes: as dense as the heart, so the heart merges into them
    y_dia = np.where(X < m, A.masks["right_ydiaphragm"], A.masks["left_ydiaphragm"])
    D += 0.5 * sig(Y - y_dia - 0.005, 0.02) * body
    return lungs


def vessels(seed: int, X, Y, A: Anatomy, eps: float) -> np.ndarray:
    """Vascular markings: tapered branches from each hilum (their own random stream)."""
    vr = stream(seed, "vessels")
    paths = []
    hila = {}
    ts = np.linspace(0, 1, 7)
    for side, sg in (("right", -1), ("left", 1)):
        hx, hy = A.m + sg * 0.1, A.heart[1] - A.heart[3] * 0.9
        hila[side] = (hx, hy)
        for _ in range(26):
            ang = vr.uniform(-0.5 * np.pi, 0.6 * np.pi)  # from up-lateral to down-lateral
            r0 = vr.uniform(0.02, 0.06)
            length = vr.uniform(0.1, 0.3)
            bend = vr.normal(0, 0.04)
            xs = hx + sg * np.cos(ang) * (r0 + length * ts) + bend * ts**2 * sg
            ys = hy - np.sin(ang) * (r0 + length * ts) * 0.9
            paths.append((xs, ys))
    # vessels taper: thick and dense near the hila, fading toward the periphery
    rh = np.minimum(*(np.hypot(X - hx, Y - hy) for hx, hy in hila.values()))
    out = 0.7 * sig(0.003 + 0.005 * np.exp(-rh / 0.12) - dist(X, Y, paths), eps) * np.exp(-rh / 0.35)
    return ndimage.gaussian_filter(out, 0.6)


def mediastinum(D, X, Y, A: Anatomy, findings: list[Finding], eps: float) -> None:
    """Mediastinum, heart and aortic knob (dense), then the trachea and main bronchi (air)."""
    m, heart = A.m, A.heart
    widen = severity(findings, "Widened Mediastinum")
    med_half = 0.055 + 0.03 * widen + 0.012 * sig(Y - 0.3, 0.05)
    mediast = sig(med_half - np.abs(X - m - 0.005), eps) * sig(Y - 0.07, 0.01) * sig(heart[1] - Y, 0.02)
    hx, hy, hax, hay = heart
    heart_m = ellipse(X, Y, hx, hy, hax, hay, eps, angle=-0.45) * sig(
        np.minimum(A.masks["right_ydiaphragm"], A.masks["left_ydiaphragm"]) + 0.01 - Y, 0.008
    )
    tort = severity(findings, "Tortuous Aorta")
    knob = (m + 0.06 + 0.02 * tort, heart[1] - heart[3] - 0.1, 0.032 + 0.01 * tort)
    aorta = ellipse(X, Y, knob[0], knob[1], knob[2], knob[2] * 1.1, eps)
    desc = sig(0.025 - np.abs(X - (knob[0] - 0.01)), eps) * sig(Y - knob[1], 0.01) * sig(hy - Y, 0.02)
    D += 0.62 * np.clip(mediast + heart_m + aorta + 0.5 * desc, 0, 1)
    trachea = sig(0.016 - np.abs(X - m + 0.004 * (Y - 0.2)), eps) * sig(Y - 0.02, 0.01) * sig(0.33 - Y, 0.01)
    bronchi = sum(band(X, Y, np.array([m, m + sg * 0.07]), np.array([0.33, 0.4]), 0.01, eps) for sg in (-1, 1))
    D -= 0.25 * np.clip(trachea + bronchi, 0, 1)
    A.masks.update(mediastinum=mediast, heart=heart_m, aortic_arch=aorta, trachea=trachea)


def lung_air(D, Y, A: Anatomy) -> np.ndarray:
    """Lungs are air: subtract density, thickest (darkest) in the mid zones; returns the lung vessel markings."""
    lung, heart_m, mediast = A.masks["lung"], A.masks["heart"], A.masks["mediastinum"]
    t_lung = np.clip((Y - A.ya) / (A.base - A.ya), 0, 1)
    thick = 0.85 + 0.15 * np.sin(np.pi * np.clip(t_lung * 1.1, 0, 1))
    D -= (0.5 + 0.08 * (A.hyper > 0)) * thick * lung * (1 - 0.6 * heart_m) * (1 - 0.7 * mediast)
    return A.masks["vessels"] * lung * (0.45 if A.hyper else 1.0) * (1.25 if A.low else 1.0)
