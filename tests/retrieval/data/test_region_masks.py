"""Region masks: RLE storage is exact, polygons round-trip (mask -> polygon -> mask keeps IoU > 0.9, holes stay
holes), IoU and Dice equal naive set arithmetic, resizing keeps a region's area."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from retrieval.data.phantom import render_phantom
from retrieval.data.region_masks import (
    decode_rle,
    dice,
    encode_rle,
    iou,
    mask_to_polygons,
    masks_from_json,
    masks_to_json,
    polygons_to_mask,
    resize_mask,
)


def _disc(h: int, w: int, cy: float, cx: float, r: float) -> np.ndarray:
    yy, xx = np.mgrid[0:h, 0:w]
    return (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 40), st.integers(1, 40), st.integers(0, 2**31 - 1), st.floats(0.0, 1.0))
def test_rle_round_trip_is_exact(h, w, seed, density):
    mask = np.random.default_rng(seed).random((h, w)) < density
    rle = encode_rle(mask)
    assert rle["size"] == [h, w] and isinstance(rle["counts"], str)
    back = decode_rle(rle)
    assert back.dtype == bool and (back == mask).all()
    assert (masks_from_json(masks_to_json({"a": mask, "b": ~mask}))["b"] == ~mask).all()


def test_empty_cells_read_as_no_masks():
    assert masks_from_json(None) == {} and masks_from_json("") == {} and masks_from_json(float("nan")) == {}


@settings(max_examples=60, deadline=None)
@given(st.integers(0, 2**31 - 1), st.integers(1, 30), st.integers(1, 30))
def test_iou_and_dice_equal_set_arithmetic(seed, h, w):
    rng = np.random.default_rng(seed)
    a, b = rng.random((h, w)) < rng.random(), rng.random((h, w)) < rng.random()
    sa = {(r, c) for r in range(h) for c in range(w) if a[r, c]}
    sb = {(r, c) for r in range(h) for c in range(w) if b[r, c]}
    union = len(sa | sb)
    assert iou(a, b) == pytest.approx(len(sa & sb) / union if union else 1.0)
    total = len(sa) + len(sb)
    assert dice(a, b) == pytest.approx(2 * len(sa & sb) / total if total else 1.0)


def test_polygon_round_trip_of_phantom_regions():
    ph = render_phantom("Large right pleural effusion. Left upper lobe nodule. Cardiomegaly.", size=192, seed=3)
    assert {"Pleural Effusion", "Nodule", "Cardiomegaly", "anatomy:Right Lung"} <= set(ph.masks)
    for name, mask in ph.masks.items():
        polys = mask_to_polygons(mask)
        assert polys and all(p["x"][0] == p["x"][-1] and p["y"][0] == p["y"][-1] for p in polys)
        assert all(0 <= v <= 1 for p in polys for v in p["x"] + p["y"])
        assert iou(polygons_to_mask(polys, *mask.shape), mask) > 0.9, name
        # a polygon is far shorter than the mask's outline in pixels
        assert sum(len(p["x"]) for p in polys) < np.count_nonzero(mask ^ np.roll(mask, 1, 0)) + 8


def test_polygons_keep_holes_and_separate_parts():
    ring = _disc(64, 80, 30, 30, 20) & ~_disc(64, 80, 30, 30, 9)
    two = ring | _disc(64, 80, 40, 68, 6)
    polys = mask_to_polygons(two)
    assert len(polys) == 3  # outer ring, its hole, the second blob
    back = polygons_to_mask(polys, 64, 80)
    assert iou(back, two) > 0.95 and not back[30, 30]  # the hole stays empty
    # normalised: the same polygons fill a mask of twice the size to the same region
    assert iou(resize_mask(polygons_to_mask(polys, 128, 160), (64, 80)) > 0.5, two) > 0.9
    assert mask_to_polygons(np.zeros((8, 8), bool)) == []


def test_resize_keeps_area_and_returns_fractions():
    disc = _disc(96, 96, 40, 50, 25)
    small = resize_mask(disc, 24)
    assert small.shape == (24, 24) and small.dtype == np.float32 and 0 <= small.min() and small.max() <= 1
    assert small.sum() * 16 == pytest.approx(disc.sum(), rel=1e-5)  # area-averaged: each cell is a coverage share
    big = resize_mask(small, 96) > 0.5
    assert iou(big, disc) > 0.95
    batch = resize_mask(np.stack([disc, ~disc]), (12, 12))
    assert batch.shape == (2, 12, 12) and np.allclose(batch[0] + batch[1], 1)
