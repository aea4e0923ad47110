"""The phantom's region masks agree with what it draws: each finding's mask is the region its box was read from,
the lung fields are the dark air the image shows, a finding's pixels lie inside its mask, and the demo manifest
carries the masks (`masks` column) for every row. The image bytes themselves are pinned by test_digests.py."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from retrieval.data.demo import build_demo_corpus, study_seed
from retrieval.data.importers.iu_xray import builtin_reports_path, read_iu_reports, report_text
from retrieval.data.phantom import MASK_ANATOMY, Finding, parse_findings, render_findings, render_phantom
from retrieval.data.region_masks import masks_from_json

ANATOMY_KEYS = {f"anatomy:{n}" for n in MASK_ANATOMY}


def _reports(n: int, step: int = 7) -> list[dict]:
    if not builtin_reports_path().is_file():
        pytest.skip("torchxrayvision's NLMCXR_reports.tgz is not installed")
    return [r for r in read_iu_reports() if (r["findings"] or r["impression"]).strip()][: n * step : step]


def _bbox(mask: np.ndarray) -> tuple[float, float, float, float]:
    """The normalised bounding box of a bool mask, as `geometry.box_from` reads it (naive loops over rows/cols)."""
    h, w = mask.shape
    rows = [r for r in range(h) if mask[r].any()]
    cols = [c for c in range(w) if mask[:, c].any()]
    return cols[0] / w, rows[0] / h, (cols[-1] + 1) / w, (rows[-1] + 1) / h


def test_masks_are_the_boxes_regions_and_lungs_are_dark():
    seen = set()
    for rec in _reports(24):
        ph = render_phantom(report_text(rec), size=160, seed=study_seed(0, rec["study_id"]))
        finding_labels = {b["label"] for b in ph.finding_boxes}
        assert set(ph.masks) == ANATOMY_KEYS | finding_labels
        for name, mask in ph.masks.items():
            assert mask.dtype == bool and mask.shape == ph.image.shape and mask.any()
        for label in finding_labels:  # a finding on both sides: one mask, the union of its boxes
            bs = [b for b in ph.finding_boxes if b["label"] == label]
            union = [min(b["x1"] for b in bs), min(b["y1"] for b in bs)] + [max(b[k] for b in bs) for k in ("x2", "y2")]
            np.testing.assert_allclose(_bbox(ph.masks[label]), union, atol=1e-4)
            seen.add(label)
        for side in ("Right", "Left"):
            lung = ph.masks[f"anatomy:{side} Lung"]
            box = next(b for b in ph.anatomy_boxes if b["label"] == f"{side} Lung")
            np.testing.assert_allclose(_bbox(lung), [box[k] for k in ("x1", "y1", "x2", "y2")], atol=1e-4)
            # the lung field is air: darker than the heart and mediastinum it borders
            assert ph.image[lung].mean() < ph.image[ph.masks["anatomy:Heart"]].mean() - 0.2
        right, left = (ph.masks[f"anatomy:{s} Lung"] for s in ("Right", "Left"))
        cols = np.arange(ph.image.shape[1])
        assert cols[right.any(0)].mean() < cols[left.any(0)].mean()  # PA view: the patient's right on the left
        assert not (right & left).any()
    assert len(seen) >= 3  # these reports name several drawable findings


@pytest.mark.parametrize(
    "finding",
    [
        Finding("Nodule", side="left", zone="upper"),
        Finding("Pleural Effusion", side="right", severity=1.3),
        Finding("Consolidation", side="right", zone="lower"),
        Finding("Pneumothorax", side="left"),
        Finding("Pacemaker"),
    ],
    ids=lambda f: f.name,
)
def test_a_findings_pixels_lie_in_its_mask(finding):
    """Drawing one finding more changes the image only inside (a blur's width around) that finding's mask."""
    base = parse_findings("Small calcified granuloma in the right mid lung.")[0]
    with_f = render_findings(base + [finding], size=160, seed=11)
    without = render_findings(base, size=160, seed=11)
    changed = np.abs(with_f.image - without.image) > 0.05
    mask = with_f.masks[finding.name]
    assert changed.sum() > 20 and mask.sum() > 20
    near = ndimage.binary_dilation(mask, iterations=3)
    # what changed is the finding's region (the mask is where its drawing passes the box threshold, 30-50% of its
    # peak: a soft edge fades out beyond it)
    assert changed[near].sum() / changed.sum() > 0.9
    assert set(with_f.masks) - set(without.masks) == {finding.name}
    for name in without.masks:  # the other regions' masks are unchanged
        assert (with_f.masks[name] == without.masks[name]).all()


def test_demo_manifest_carries_the_masks(tmp_path):
    _reports(1)
    df = build_demo_corpus(tmp_path, size=96, seed=0, limit=6, workers=1, show_progress=False)
    for _, row in df.iterrows():
        masks = masks_from_json(row["masks"])
        ph = render_phantom(row["report"], size=96, seed=int(row["seed"]))
        assert set(masks) == set(ph.masks)
        for name, mask in masks.items():
            assert (mask == ph.masks[name]).all()
