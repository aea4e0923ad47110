"""Findings -> a phantom: draw the anatomy into a density map, add each finding's drawer, expose, blur and add
noise; read the anatomy boxes off the drawn masks, and keep the region masks (`MASK_ANATOMY` and each drawn
finding) beside the image."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
from scipy import ndimage

from retrieval.data.phantom import anatomy, skeleton
from retrieval.data.phantom.context import DrawContext
from retrieval.data.phantom.drawers import draw_finding
from retrieval.data.phantom.geometry import add_box, smooth_noise, stream
from retrieval.data.phantom.parse import Finding, parse_findings
from retrieval.labels import ANATOMY, ANATOMY_PREFIX

# The organs whose masks a phantom keeps (the segmentation task's anatomy), by their `labels.ANATOMY` name.
MASK_ANATOMY = ("Right Lung", "Left Lung", "Heart")


@dataclass
class Phantom:
    """A rendered study: image float32 HxW in [0, 1], finding boxes, anatomy boxes, findings, unrendered names,
    and `masks`: bool HxW per region, named as the boxes are (finding names, `anatomy:`-prefixed organs)."""

    image: np.ndarray
    finding_boxes: list[dict[str, Any]]
    anatomy_boxes: list[dict[str, Any]]
    findings: list[Finding]
    unrendered: list[str] = field(default_factory=list)
    masks: dict[str, np.ndarray] = field(default_factory=dict)

    @property
    def boxes(self) -> list[dict[str, Any]]:
        """Finding boxes then anatomy boxes (anatomy labels carry the `anatomy:` prefix)."""
        return self.finding_boxes + [{**b, "label": f"{ANATOMY_PREFIX}{b['label']}"} for b in self.anatomy_boxes]


def draw_anatomy(findings: list[Finding], seed: int, S: int) -> tuple[np.ndarray, DrawContext]:
    """The density map of the patient's chest (whole-chest findings change its geometry) and the context the
    finding drawers draw on. Anatomy depends only on `seed` (and those findings)."""
    rng = stream(seed, "anatomy")
    eps = 2.0 / S
    X, Y = anatomy.grid(rng, S)
    A = anatomy.patient(rng, findings)
    D = np.zeros((S, S), np.float32)
    body = anatomy.soft_tissue(D, rng, X, Y, A, eps)
    lungs = anatomy.lungs_and_liver(D, X, Y, A, body, eps)
    A.masks["vessels"] = anatomy.vessels(seed, X, Y, A, eps)
    A.masks["lung"] = np.clip(lungs["right"] + lungs["left"], 0, 1)
    A.masks.update({f"{k}_lung": v for k, v in lungs.items()})
    anatomy.mediastinum(D, X, Y, A, findings, eps)
    lung_vessels = anatomy.lung_air(D, Y, A)
    sx = skeleton.spine(D, X, Y, A, findings, eps)
    skeleton.ribs(D, X, Y, A, sx, body, eps)
    skeleton.clavicles(D, rng, X, Y, A, eps)
    skeleton.gastric_bubble_and_breasts(D, rng, X, Y, A, eps)
    return D, DrawContext(X, Y, eps, A, lungs, skeleton.rib_paths(A), lung_vessels)


def render_findings(findings: list[Finding], size: int = 256, seed: int = 0) -> Phantom:
    """Draw a phantom with the given findings. Anatomy and noise depend only on `seed`; each finding has its own
    random stream, so removing a finding changes only the pixels it drew."""
    S = int(size)
    D, ctx = draw_anatomy(findings, seed, S)
    # The display window comes from the anatomy alone, so a finding never changes pixels outside its own area.
    nr = stream(seed, "noise")
    k = nr.uniform(1.1, 1.5)
    anat = 1.0 - np.exp(-k * np.maximum(D + 0.2 * ctx.lung_vessels, 0)[::4, ::4])
    lo, hi = (float(v) for v in np.percentile(anat, [0.5, 99.8]))
    hi = lo + (hi - lo) * 1.15  # headroom: metal and calcium show brighter than the mediastinum
    for idx, f in enumerate(findings):
        contrib = draw_finding(f, stream(seed, "finding", f.name, f.side, idx), ctx)
        if contrib is not None:
            D += contrib
    D += 0.2 * ctx.lung_vessels
    D = np.maximum(D, 0)
    # exposure, blur, noise
    D = D * (1 + 0.05 * smooth_noise(nr, (S, S), S / 16))
    img = 1.0 - np.exp(-k * D)
    img = ndimage.gaussian_filter(img, 0.7 * S / 256)
    img = img + nr.normal(0, nr.uniform(0.006, 0.02), img.shape).astype(np.float32)
    img = np.clip((img - lo) / max(hi - lo, 1e-3), 0, 1)
    gamma = nr.uniform(0.85, 1.2)
    img = img**gamma
    masks = {**anatomy_masks(ctx.anatomy), **ctx.masks}
    return Phantom(img.astype(np.float32), ctx.boxes, anatomy_boxes(ctx.anatomy), list(findings), masks=masks)


def anatomy_masks(A: anatomy.Anatomy) -> dict[str, np.ndarray]:
    """The `MASK_ANATOMY` organs' masks (drawn mask > 0.5, the threshold of their boxes), `anatomy:`-prefixed."""
    return {f"{ANATOMY_PREFIX}{name}": A.masks[name.lower().replace(" ", "_")] > 0.5 for name in MASK_ANATOMY}


def anatomy_boxes(A: anatomy.Anatomy) -> list[dict[str, Any]]:
    """Boxes of the organs named in `retrieval.labels.ANATOMY`, in that order, read off the drawn masks (an
    organ's mask is keyed by its name in snake case); the lung bases' boxes come from each lung's mask."""
    lung_bases: dict[str, dict[str, Any]] = {}
    for side in ("right", "left"):
        lung_bases.update(_lung_base_boxes(A.masks[f"{side}_lung"] > 0.5, side))
    boxes: list[dict[str, Any]] = []
    for name in ANATOMY:
        key = name.lower().replace(" ", "_")
        if key in A.masks:
            add_box(boxes, name, A.masks[key], 0.5)
        elif name in lung_bases:
            boxes.append(lung_bases[name])
    return boxes


def _lung_base_boxes(lung: np.ndarray, side: str) -> dict[str, dict[str, Any]]:
    """The costophrenic angle and hemidiaphragm boxes of one lung's mask, by name."""
    S = lung.shape[0]
    ys, xs = np.nonzero(lung)
    if len(xs) == 0:
        return {}
    # the costophrenic angle: the lateral-lowest corner of the lung
    lateral = -xs if side == "right" else xs
    j = np.argmax(ys * 1.0 + 0.6 * lateral)
    cx, cy = xs[j] / S, ys[j] / S
    r = 0.04
    boxes = [
        {
            "label": f"{side.capitalize()} Costophrenic Angle",
            "x1": round(max(0, cx - r), 4),
            "y1": round(max(0, cy - r * 1.5), 4),
            "x2": round(min(1, cx + r), 4),
            "y2": round(min(1, cy + r * 0.5), 4),
        }
    ]
    # the hemidiaphragm: the lung's lower border (lung pixels with no lung below), in the lung's lower half
    floor = lung & ~np.vstack([lung[1:], np.zeros((1, lung.shape[1]), bool)])
    floor[: int((ys.min() + ys.max()) / 2)] = False
    add_box(boxes, f"{side.capitalize()} Hemidiaphragm", floor, 0.5, grow=max(1, S // 64))  # grown a few pixels
    return {b["label"]: b for b in boxes}


def render_phantom(text: str, size: int = 256, seed: int = 0) -> Phantom:
    """A phantom for a report: parse its findings, draw them, list what could not be drawn."""
    findings, unrendered = parse_findings(text)
    ph = render_findings(findings, size=size, seed=seed)
    drawn = {b["label"] for b in ph.finding_boxes}
    ph.unrendered = unrendered + [f.name for f in findings if f.name not in drawn]
    return ph
