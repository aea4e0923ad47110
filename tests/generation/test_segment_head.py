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


def _moving_square_manifest(root, n: int = 30, size: int = 64):
    """Studies whose one finding (a bright square) sits at one of three places, its mask in the `masks` column:
    a head that does not read the image can only answer the blurred mean of the three."""
    import pandas as pd
    from PIL import Image

    from retrieval.data.region_masks import masks_to_json

    rng = np.random.default_rng(0)
    (root / "img").mkdir(parents=True)
    rows = []
    for i in range(n):
        img = rng.normal(0.2, 0.03, (size, size))
        x = (4, 24, 44)[i % 3]
        mask = np.zeros((size, size), bool)
        mask[20:40, x : x + 16] = True
        img[mask] += 0.6
        Image.fromarray((np.clip(img, 0, 1) * 255).astype(np.uint8)).save(root / "img" / f"{i}.png")
        rows.append({
            "image_id": f"i{i}", "study_id": f"s{i}", "patient_id": f"p{i}", "image_path": f"img/{i}.png",
            "view": "PA", "report": "there is a nodule.", "findings": "there is a nodule.", "impression": "",
            "labels": ["Nodule"], "boxes": [], "split": "test" if i >= 24 else "train", "source": "synthetic",
            "masks": masks_to_json({"Nodule": mask}),
        })  # fmt: skip
    df = pd.DataFrame(rows)
    df.attrs["root"] = str(root)
    return df


def test_vlm_training_fits_the_segment_head_and_generate_answers_segment(tmp_path):
    """`cxr vlm train` on a manifest with region masks saves a segment head; `generate_for_image(task="segment")`
    answers with the region's polygons and RLE, placed where the image shows it (better than the mean training
    mask, the image-free answer); a folder without a head, or an unknown region, is one usage error."""
    from generation.training.train import VLMTrainConfig, train_vlm
    from generation.writing.image_answer import generate_for_image
    from retrieval.errors import UsageError

    df = _moving_square_manifest(tmp_path)
    cfg = VLMTrainConfig(encoders=["patch:1"], steps=0, lm_path="tiny", rag_k=0, visual_grid=4)
    train_vlm(df, tmp_path / "vlm", cfg, progress=False)
    assert (tmp_path / "vlm" / "segment_head.safetensors").exists()
    truth = [next(iter(masks_from_json_cell(m).values())) for m in df["masks"]]
    prior = np.mean([truth[i] for i in range(24)], axis=0) > 0.5
    ours, base = [], []
    for i in range(24, 30):
        res = generate_for_image(tmp_path / df.iloc[i]["image_path"], None, tmp_path / "vlm", task="segment",
                                 phrase="nodule", k=0)  # fmt: skip
        assert res["task"] == "segment" and res["region"] == "Nodule" and res["source"] == "segment head"
        mask = decode_rle(res["rle"])
        assert mask.shape == truth[i].shape and "mask" not in res
        drawn = polygons_to_mask(res["polygons"], *mask.shape)
        assert iou(drawn, mask) > 0.8  # the polygons draw the RLE's region
        ours.append(iou(mask, truth[i]))
        base.append(iou(prior, truth[i]))
    assert np.mean(ours) > max(0.6, np.mean(base) + 0.2), (ours, base)
    with pytest.raises(UsageError, match="knows no region 'heart'; it knows: Nodule"):
        generate_for_image(tmp_path / df.iloc[0]["image_path"], None, tmp_path / "vlm", task="segment",
                           phrase="heart", k=0)  # fmt: skip
    cfg.segment_head = False
    train_vlm(df, tmp_path / "plain", cfg, progress=False)
    with pytest.raises(UsageError, match="no segment head"):
        generate_for_image(tmp_path / df.iloc[0]["image_path"], None, tmp_path / "plain", task="segment",
                           phrase="nodule", k=0)  # fmt: skip
    with pytest.raises(UsageError, match="needs --phrase"):
        generate_for_image(tmp_path / df.iloc[0]["image_path"], None, tmp_path / "vlm", task="segment", k=0)


def masks_from_json_cell(cell):
    from retrieval.data.region_masks import masks_from_json

    return masks_from_json(cell)
