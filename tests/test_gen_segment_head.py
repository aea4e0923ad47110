"""The segmentation head: fitted on a few phantoms it beats the mean training mask on held-out phantoms, its
closed form equals a naive ridge to the full maps, it saves and reloads, and `segment` answers with a mask and
polygons that draw the same region (or None for a region it does not know)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from generation.heads.segment_head import (
    SegmentHead,
    answer_json,
    fit_segment_head,
    masks_from_maps,
    segment,
    segment_features,
)
from generation.model.encoders import FrozenPatchEncoder
from retrieval.data.phantom import render_phantom
from retrieval.data.region_masks import decode_rle, iou, polygons_to_mask, resize_mask

REPORTS = [
    "No acute cardiopulmonary abnormality.",
    "Cardiomegaly. No effusion.",
    "Large right pleural effusion.",
    "Small left pleural effusion.",
    "Hyperexpanded lungs consistent with emphysema.",
    "Low lung volumes.",
]
ANATOMY = ("anatomy:Right Lung", "anatomy:Left Lung", "anatomy:Heart")


@pytest.fixture(scope="module")
def phantoms():
    encoder = FrozenPatchEncoder(seed=1, image_size=128, patch=16, dim=64)
    images, masks = [], []
    for i in range(48):
        ph = render_phantom(REPORTS[i % len(REPORTS)], size=128, seed=1000 + i)
        images.append(ph.image)
        masks.append(ph.masks)
    transform = encoder.image_transform()
    tokens = encoder.image_tokens(torch.stack([transform(im) for im in images]))  # (48, 64, 64)
    return encoder, images, masks, tokens


def test_fitted_head_beats_the_mean_mask_on_held_out_phantoms(phantoms):
    _, _, masks, tokens = phantoms
    train, test = range(36), range(36, 48)
    feats = segment_features(tokens, pool=8)
    head = fit_segment_head(feats[list(train)], [masks[i] for i in train], pool=8, lam=0.1, min_rows=4)
    assert set(ANATOMY) <= set(head.names) and "Pleural Effusion" in head.names
    for name in ANATOMY:
        prior = np.mean([resize_mask(masks[i][name], 128) for i in train], axis=0) > 0.5  # image-free
        pred = head.segment(feats[list(test)], name, 128)
        ours = np.mean([iou(p, masks[i][name]) for p, i in zip(pred, test, strict=True)])
        base = np.mean([iou(prior, masks[i][name]) for i in test])
        assert ours > base + 0.02, (name, ours, base)
        assert ours > 0.75


def test_closed_form_equals_a_naive_ridge_on_the_maps(phantoms):
    """With as many components as training rows, the shape model loses nothing: the head's maps are the plain
    ridge regression (centred features, penalty lam x mean squared norm) to the full grid maps."""
    _, _, masks, tokens = phantoms
    feats = segment_features(tokens, pool=2).astype(np.float64)  # (48, 256)
    lam, rows = 0.3, list(range(20))
    head = fit_segment_head(feats[rows], [masks[i] for i in rows], pool=2, lam=lam, grid=16, components=32)
    x = feats[rows] - feats[rows].mean(0)
    y = np.stack([resize_mask(masks[i]["anatomy:Heart"], 16).ravel() for i in rows])
    alpha = lam * (x**2).sum(1).mean()
    w = np.linalg.solve(x.T @ x + alpha * np.eye(x.shape[1]), x.T @ (y - y.mean(0)))
    naive = np.clip(y.mean(0) + (feats[20:] - feats[rows].mean(0)) @ w, 0, 1).reshape(-1, 16, 16)
    ours = head.soft_maps(feats[20:], head.region("Heart"))
    np.testing.assert_allclose(ours, naive, atol=1e-4)


def test_save_load_and_segment_answers(phantoms, tmp_path):
    encoder, images, masks, tokens = phantoms
    feats = segment_features(tokens, pool=4)
    head = fit_segment_head(feats[:36], masks[:36], pool=4, min_rows=4)
    head.save(tmp_path)
    again = SegmentHead.load(tmp_path)
    assert again.names == head.names and again.pool == 4
    np.testing.assert_allclose(again.soft_maps(feats[40:], 0), head.soft_maps(feats[40:], 0), atol=1e-5)
    assert SegmentHead.load(tmp_path / "none") is None
    assert head.region("right lung") == head.region("anatomy:Right Lung") is not None
    assert head.segment(feats[:2], "Nodule", 64) is None  # not in the training masks
    # from tokens and from the image: the same answer; polygons draw the mask
    by_tokens = segment(head, tokens[40], "Right Lung", size=128)
    by_image = segment(head, images[40], "anatomy:right lung", encoder=encoder)
    assert by_tokens["region"] == by_image["region"] == "anatomy:Right Lung"
    assert by_tokens["mask"].shape == by_image["mask"].shape == (128, 128)
    assert iou(by_tokens["mask"], by_image["mask"]) > 0.98
    assert iou(polygons_to_mask(by_image["polygons"], 128, 128), by_image["mask"]) > 0.9
    data = json.loads(json.dumps(answer_json(by_image)))  # what the API sends
    assert (np.array(data["mask"], dtype=bool) == by_image["mask"]).all()
    assert (decode_rle(data["rle"]) == by_image["mask"]).all() and data["polygons"] == by_image["polygons"]
    assert segment(head, tokens[40], "Pacemaker") is None
    with pytest.raises(ValueError):
        segment(head, images[40], "Heart")


def test_fit_for_rows_keeps_the_token_grid_it_was_given(phantoms):
    """Tokens cached at a coarser grid than `pool` (a VLM pooled to 4x4) fit a head that reads any finer grid."""
    from generation.heads.segment_head import fit_for_rows
    from generation.model.encoders import pool_grid

    _, _, masks, tokens = phantoms
    coarse = pool_grid(tokens, 4)  # (48, 16, 64)
    head = fit_for_rows({r: coarse[r] for r in range(36)}, {r: masks[r] for r in range(36)}, min_rows=4)
    assert head.pool == 4
    a = head.segment(head.features(coarse[40:]), "Heart", 64)
    b = head.segment(head.features(tokens[40:]), "Heart", 64)  # the full 8x8 grid, pooled to 4x4
    assert (a == b).all()
    with pytest.raises(ValueError, match="fitted on"):
        head.soft_maps(np.zeros((1, 7)), 0)


def test_an_unsure_map_is_cut_at_half_its_peak():
    maps = np.zeros((2, 8, 8), np.float32)
    maps[0, 2:4, 2:4] = 0.9
    maps[1, 5, 5], maps[1, 5, 6], maps[1, 0, 0] = 0.3, 0.2, 0.1
    out = masks_from_maps(maps)
    assert out[0].sum() == 4 and out[1].sum() == 2 and out[1, 5, 5] and out[1, 5, 6] and not out[1, 0, 0]
