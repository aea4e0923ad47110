"""Synthetic PA chest radiographs ("phantoms") that agree with a report: anatomy with patient variation plus
the findings the report names, drawn where the report places them, with a box for every finding and organ.

It is a demo and a test bed, not a simulator: densities are summed in a 2-D attenuation map (soft tissue,
air-filled lungs, heart, mediastinum, spine, ribs, clavicles, diaphragm), then exposed (1 - exp(-k * density)),
blurred and given noise. Geometry is drawn on a normalised grid that is rotated per patient, so boxes are read
off the drawn masks in image coordinates and stay exact; `Phantom.masks` keeps the region masks themselves (the
lungs, the heart and each drawn finding; a finding's box is its mask's bounding box). The patient's right is on
the image's left (PA view).

`parse_findings(text)` turns a report into `Finding`s (negation-aware through `retrieval.labels`; side, zone and
severity from the words near each mention); `render_findings(findings, size, seed)` draws them;
`render_phantom(text, size, seed)` does both. Anatomy and noise depend only on the seed, each finding has its own
random stream, so removing a finding changes only the pixels it drew.

The modules, in drawing order:

| module | holds |
|---|---|
| `rules.py` | `FINDING_RULES` (name, mention regex, the CheXpert labels it stands for); side, zone, severity words |
| `parse.py` | `Finding`, `parse_findings` |
| `geometry.py` | drawing primitives on the grid (soft steps, ellipses, bands, smooth noise, boxes) and random streams |
| `anatomy.py` | `Anatomy` (per-patient geometry and masks): soft tissue, lungs, vessels, mediastinum |
| `skeleton.py` | spine, ribs, clavicles, gastric bubble, breast shadows |
| `context.py` | `DrawContext` (what a finding drawer sees), the `DRAWERS` registry and `@drawer`, placement helpers |
| `drawers/` | one drawer per finding, a module per kind (chest, pleura, parenchyma, lesions, bones, devices) |
| `render.py` | `Phantom`, `render_findings`, `render_phantom`, the anatomy boxes, the region masks (`MASK_ANATOMY`) |
"""

from __future__ import annotations

from retrieval.data.phantom.context import DRAWERS, DrawContext, drawer
from retrieval.data.phantom.parse import Finding, parse_findings
from retrieval.data.phantom.render import MASK_ANATOMY, Phantom, render_findings, render_phantom
from retrieval.data.phantom.rules import FINDING_RULES

# The drawing's version: the demo corpus cache keys on it, so bump it whenever a seed's pixels or boxes change.
VERSION = 2

__all__ = [
    "DRAWERS",
    "FINDING_RULES",
    "MASK_ANATOMY",
    "VERSION",
    "DrawContext",
    "Finding",
    "Phantom",
    "drawer",
    "parse_findings",
    "render_findings",
    "render_phantom",
]
