"""Whole-chest findings: those the anatomy's geometry already shows (boxed here, nothing added), the aortic rim
calcification and the hiatal hernia."""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from retrieval.data.phantom.context import DrawContext, drawer, sides
from retrieval.data.phantom.geometry import ellipse, sig
from retrieval.data.phantom.parse import Finding


@drawer("Cardiomegaly")
def cardiomegaly(f: Finding, rng: np.random.Generator, ctx: DrawContext) -> None:
    ctx.mark(f.name, ctx.anatomy.masks["heart"], 0.5)


@drawer("Widened Mediastinum")
def widened_mediastinum(f: Finding, rng: np.random.Generator, ctx: DrawContext) -> None:
    A = ctx.anatomy
    ctx.mark(f.name, A.masks["mediastinum"] * (ctx.Y < A.heart[1] - A.heart[3]), 0.5)


@drawer("Tortuous Aorta")
def tortuous_aorta(f: Finding, rng: np.random.Generator, ctx: DrawContext) -> None:
    ctx.mark(f.name, ctx.anatomy.masks["aortic_arch"], 0.5)


@drawer("Emphysema", "Low Lung Volumes")
def lung_volume(f: Finding, rng: np.random.Generator, ctx: DrawContext) -> None:
    ctx.mark(f.name, ctx.anatomy.masks["lung"], 0.5)


@drawer("Elevated Hemidiaphragm")
def elevated_hemidiaphragm(f: Finding, rng: np.random.Generator, ctx: DrawContext) -> None:
    X, Y, A, eps = ctx.X, ctx.Y, ctx.anatomy, ctx.eps
    for side in sides(f, rng, "right"):
        strip = sig(0.03 - np.abs(Y - A.masks[f"{side}_ydiaphragm"]), eps) * sig(
            0.2 - np.abs(X - (0.5 + (0.2 if side == "left" else -0.2))), 0.01
        )
        ctx.mark(f.name, strip, 0.5)


@drawer("Scoliosis")
def scoliosis(f: Finding, rng: np.random.Generator, ctx: DrawContext) -> None:
    Y = ctx.Y
    ctx.mark(f.name, ctx.anatomy.masks["spine"] * (Y > 0.1) * (Y < 0.85), 0.5)


@drawer("Aortic Calcification")
def aortic_calcification(f: Finding, rng: np.random.Generator, ctx: DrawContext) -> np.ndarray:
    out = np.zeros_like(ctx.X)
    aorta = ctx.anatomy.masks["aortic_arch"]
    rim = np.clip(aorta - ndimage.minimum_filter(aorta, size=max(3, ctx.size // 64)), 0, 1)
    o = rim * (ctx.X > 0.5 + 0.04)  # the calcified rim on the outer curve of the knob
    out += 0.9 * o
    ctx.mark(f.name, o, 0.3)
    return out


@drawer("Hiatal Hernia")
def hiatal_hernia(f: Finding, rng: np.random.Generator, ctx: DrawContext) -> np.ndarray:
    X, Y, A, eps = ctx.X, ctx.Y, ctx.anatomy, ctx.eps
    out = np.zeros_like(X)
    hx, hy = 0.5 + 0.02, A.heart[1] + 0.01
    o = ellipse(X, Y, hx, hy, 0.06 * f.severity, 0.045 * f.severity, eps)
    gas = ellipse(X, Y, hx, hy, 0.05 * f.severity, 0.036 * f.severity, eps) * sig(hy - 0.005 - Y, eps)
    wall = np.clip(o - ellipse(X, Y, hx, hy, 0.052 * f.severity, 0.038 * f.severity, eps), 0, 1)
    out += 0.25 * o + 0.3 * wall - 0.75 * gas  # a retrocardiac gas bubble with an air-fluid level
    ctx.mark(f.name, o, 0.5)
    return out
