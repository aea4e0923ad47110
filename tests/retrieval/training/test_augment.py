"""Radiograph augmentation (retrieval/training/augment.py): sides kept, bounded changes, seeded draws, and
`cxr train --augment` running the tower on augmented training pixels only."""

from __future__ import annotations

import json

import numpy as np
import pytest

from retrieval.training.augment import RadiographAugment


def _left_bright(h: int = 64, w: int = 48) -> np.ndarray:
    img = np.full((h, w), 0.2, dtype=np.float32)
    img[:, : w // 3] = 0.9  # a bright band on the image's left
    return img


def test_never_flips_and_stays_in_range() -> None:
    aug, img = RadiographAugment(), _left_bright()
    for seed in range(60):
        out = aug(img, np.random.default_rng(seed))
        h, w = out.shape
        assert 0.85 * 64 - 1 <= h <= 64 and 0.85 * 48 - 1 <= w <= 48
        assert out.min() >= 0.0 and out.max() <= 1.0
        assert out[:, : w // 3].mean() > out[:, -w // 3 :].mean() + 0.2  # the bright side is still the left


def test_draws_are_seeded_and_vary() -> None:
    aug, img = RadiographAugment(), _left_bright()
    a, b = aug(img, np.random.default_rng(3)), aug(img, np.random.default_rng(3))
    np.testing.assert_array_equal(a, b)
    c = aug(img, np.random.default_rng(4))
    assert a.shape != c.shape or not np.allclose(a, c)


def test_identity_settings_return_the_image() -> None:
    aug = RadiographAugment(max_rotate=0.0, min_crop=1.0, contrast=(1.0, 1.0), gamma=(1.0, 1.0))
    img = np.random.default_rng(0).random((32, 40)).astype(np.float32)
    np.testing.assert_allclose(aug(img, np.random.default_rng(0)), img, atol=1e-6)


@pytest.mark.slow
def test_train_augments_training_batches_only(tmp_path, capsys, monkeypatch) -> None:
    from train_manifest import make_manifest

    from cli.main import main

    calls = []
    real = RadiographAugment.__call__
    monkeypatch.setattr(RadiographAugment, "__call__", lambda self, a, rng: calls.append(1) or real(self, a, rng))
    manifest = make_manifest(tmp_path / "data", 16)
    out = tmp_path / "run"
    args = ["train", "-m", str(manifest), "--out", str(out), "--model", "cxr-tiny", "--augment", "--json"]
    assert main([*args, "--epochs", "1", "--batch-size", "8"]) == 0
    info = json.loads(capsys.readouterr().out)
    train_images = sum(1 for i in range(16) if i % 20 < 14)
    assert len(info["history"]) == 1 and info["config"]["augment"] is True
    assert len(calls) == train_images  # each training image once per epoch; validation never augmented
    assert not list((out / "feature_cache").glob("image-*"))  # no cached image features: the tower ran each epoch
