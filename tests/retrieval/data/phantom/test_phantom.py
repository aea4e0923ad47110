"""The phantom renderer: determinism, image and box validity, report parsing, and that each finding changes
the pixels inside its own box (rendered with and without it, same seed)."""

from __future__ import annotations

import numpy as np
import pytest

from retrieval.data.phantom import Finding, parse_findings, render_findings, render_phantom
from retrieval.labels import ANATOMY

REPORTS = [
    "Normal chest. Lungs are clear.",
    "Large right pleural effusion. Moderate cardiomegaly.",
    "Left apical pneumothorax, moderate.",
    "Calcified granuloma in the left upper lobe. 1.5 cm nodule right midlung.",
    "Hyperinflated lungs consistent with emphysema. Left basilar atelectasis.",
    "Left chest pacemaker. Sternotomy wires. Right IJ central venous catheter.",
    "Bilateral perihilar edema with small bilateral effusions. Thoracic scoliosis. Hiatal hernia.",
]


def test_same_seed_same_image_other_seed_other_image():
    a = render_phantom(REPORTS[1], size=128, seed=3)
    b = render_phantom(REPORTS[1], size=128, seed=3)
    c = render_phantom(REPORTS[1], size=128, seed=4)
    np.testing.assert_array_equal(a.image, b.image)
    assert a.boxes == b.boxes
    assert np.abs(a.image - c.image).mean() > 0.01


@pytest.mark.parametrize("text", REPORTS)
def test_image_and_boxes_are_valid(text):
    ph = render_phantom(text, size=128, seed=1)
    assert ph.image.dtype == np.float32 and ph.image.shape == (128, 128)
    assert 0.0 <= ph.image.min() and ph.image.max() <= 1.0 and ph.image.std() > 0.1
    for box in ph.boxes:
        assert set(box) == {"label", "x1", "y1", "x2", "y2"}
        assert 0.0 <= box["x1"] < box["x2"] <= 1.0 and 0.0 <= box["y1"] < box["y2"] <= 1.0, box
    anatomy = {b["label"].removeprefix("anatomy:") for b in ph.boxes if b["label"].startswith("anatomy:")}
    assert set(ANATOMY) <= anatomy
    assert not any(b["label"].startswith("anatomy:") for b in ph.finding_boxes)


def test_anatomy_is_where_a_pa_film_has_it():
    ph = render_phantom("Normal.", size=256, seed=0)
    box = {b["label"]: b for b in ph.anatomy_boxes}
    # the patient's right lung is on the image's left; the heart sits low and mostly on the image's right
    assert box["Right Lung"]["x2"] < box["Left Lung"]["x2"] and box["Right Lung"]["x1"] < 0.3
    heart = box["Heart"]
    assert (heart["x1"] + heart["x2"]) / 2 > 0.5 and heart["y1"] > 0.4
    assert box["Trachea"]["y2"] < heart["y1"]


def test_parse_findings_negation_side_zone_severity():
    findings, unrendered = parse_findings(
        "No pneumothorax. Small left pleural effusion. Right upper lobe nodule. Cannot exclude pneumonia. Kyphosis."
    )
    by_name = {f.name: f for f in findings}
    assert set(by_name) == {"Pleural Effusion", "Nodule"}
    assert by_name["Pleural Effusion"].side == "left" and by_name["Pleural Effusion"].severity < 1
    assert by_name["Nodule"].side == "right" and by_name["Nodule"].zone == "upper"
    assert "kyphosis" in unrendered
    assert parse_findings("The lungs are clear. Normal heart size.") == ([], [])
    bil, _ = parse_findings("Bibasilar atelectasis.")
    assert bil[0].side == "bilateral" and bil[0].zone == "lower"


def test_render_phantom_draws_the_named_findings():
    ph = render_phantom(
        "Large right pleural effusion. Left upper lobe calcified granuloma.", size=256, seed=2
    )
    labels = {b["label"] for b in ph.finding_boxes}
    assert labels == {"Pleural Effusion", "Calcified Granuloma"}
    effusion = next(b for b in ph.finding_boxes if b["label"] == "Pleural Effusion")
    granuloma = next(b for b in ph.finding_boxes if b["label"] == "Calcified Granuloma")
    assert effusion["x2"] <= 0.5 and effusion["y1"] > 0.4  # patient's right = image left, at the base
    assert granuloma["x1"] >= 0.5 and granuloma["y2"] < 0.55  # patient's left = image right, upper zone


LOCAL_FINDINGS = [
    Finding("Pleural Effusion", "right", None, 1.0),
    Finding("Pneumothorax", "left", "upper", 1.0),
    Finding("Consolidation", "left", "lower", 1.0),
    Finding("Opacity", "right", "mid", 1.0),
    Finding("Nodule", "right", "mid", 1.0),
    Finding("Mass", "left", "upper", 1.0),
    Finding("Calcified Granuloma", "left", "upper", 1.0),
    Finding("Atelectasis", "left", "lower", 0.65),
    Finding("Scarring", "right", "upper", 1.0),
    Finding("Interstitial Markings", "right", "lower", 1.0),
    Finding("Pleural Thickening", "right", "upper", 1.0),
    Finding("Cavity", "left", "upper", 1.0),
    Finding("Calcified Lymph Nodes", "right", None, 1.0),
    Finding("Rib Fracture", "left", None, 1.0),
    Finding("Pacemaker", "left", None, 1.0),
    Finding("Central Line", "right", None, 1.0),
    Finding("Sternotomy Wires", None, None, 1.0),
    Finding("Surgical Clips", "right", None, 1.0),
    Finding("Endotracheal Tube", None, None, 1.0),
    Finding("Enteric Tube", None, None, 1.0),
    Finding("Hiatal Hernia", None, None, 1.0),
    Finding("Aortic Calcification", None, None, 1.0),
]


@pytest.mark.parametrize("finding", LOCAL_FINDINGS, ids=lambda f: f.name)
def test_a_finding_changes_the_pixels_inside_its_box(finding):
    size = 256
    base = render_findings([], size=size, seed=7).image
    ph = render_findings([finding], size=size, seed=7)
    diff = np.abs(ph.image - base)
    assert ph.finding_boxes and all(b["label"] == finding.name for b in ph.finding_boxes)
    inside = np.zeros(diff.shape, bool)
    for b in ph.finding_boxes:
        r0, r1 = int(b["y1"] * size), int(np.ceil(b["y2"] * size))
        c0, c1 = int(b["x1"] * size), int(np.ceil(b["x2"] * size))
        inside[r0:r1, c0:c1] = True
    assert diff[inside].sum() / diff.sum() > 0.85  # the change is concentrated in the box
    assert diff.max() > 0.1  # and clearly visible at 256 px (on a 0..1 scale)
    assert inside.mean() < 0.35  # a local finding has a local box


def test_whole_chest_findings_change_geometry():
    base = render_findings([], size=128, seed=5)
    big = render_findings([Finding("Cardiomegaly", severity=1.45)], size=128, seed=5)
    w = {b["label"]: b["x2"] - b["x1"] for b in base.anatomy_boxes}
    wb = {b["label"]: b["x2"] - b["x1"] for b in big.anatomy_boxes}
    assert wb["Heart"] > 1.2 * w["Heart"]
    emph = render_findings([Finding("Emphysema")], size=128, seed=5)
    lung_h = {p.anatomy_boxes[0]["y2"] - p.anatomy_boxes[0]["y1"] for p in (base,)}
    assert emph.anatomy_boxes[0]["y2"] - emph.anatomy_boxes[0]["y1"] > max(lung_h)  # larger lungs


def test_every_rule_has_a_drawer():
    from retrieval.data.phantom import DRAWERS, FINDING_RULES

    assert {name for name, _, _ in FINDING_RULES} == set(DRAWERS)
