"""The one image path (retrieval.models.image_stream) and the pretrained CNN tower (cxr-small) on it: every caller
gets the same vectors, bad items are raised or skipped by one rule, the frozen-boundary cut equals the whole tower,
and the image feature store skips the tower only where it is valid."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from PIL import Image
from train_manifest import make_manifest

from retrieval.errors import ImageReadError
from retrieval.models import load_model
from retrieval.models.image_stream import encode_image_items, stream_images

SIZE = 64  # the CNN is fully convolutional: a small input keeps these tests fast on 2 cores


@pytest.fixture(scope="module")
def small() -> torch.nn.Module:
    model = load_model("cxr-small", device="cpu")
    model.clip.visual.image_size = (SIZE, SIZE)  # the transform follows the tower's size
    return model


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> list[str]:
    folder = tmp_path_factory.mktemp("imgs")
    rng = np.random.default_rng(0)
    paths = []
    for i in range(7):
        p = folder / f"im{i}.png"
        Image.fromarray((rng.random((40 + i, 50)) * 255).astype(np.uint8)).save(p)
        paths.append(str(p))
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"junk")
    return paths + [str(folder / "broken.png")]


def _naive(model, paths) -> np.ndarray:
    """One image at a time, by hand: read, transform, tower, projector, normalise."""
    from retrieval.data.image_io import read_image

    out = []
    with torch.no_grad():
        for p in paths:
            x = model.image_transform()(read_image(p))[None]
            out.append(torch.nn.functional.normalize(model.project_images(model.image_features(x)), dim=-1)[0])
    return torch.stack(out).numpy()


def test_every_caller_gets_the_naive_vectors(small, files, tmp_path):
    from index.encode import stream_image_vectors

    good = files[:7]
    want = _naive(small, good)
    np.testing.assert_allclose(small.encode_images(good, batch_size=3), want, atol=1e-5)
    got = np.zeros_like(want)
    for ids, vecs, bad in stream_image_vectors(good, small, [[0, 1, 2], [3, 4, 5, 6]], workers=1):
        assert not bad
        got[ids] = vecs
    np.testing.assert_allclose(got, want, atol=1e-5)
    tokens, pos, bad = encode_image_items(small, good, output="tokens", batch_size=4)
    assert tokens.shape == (7, (SIZE // 32) ** 2, 1280) and pos.tolist() == list(range(7)) and not bad
    feats, _, _ = encode_image_items(small, good, output="features")
    torch.testing.assert_close(tokens.mean(1), feats, atol=1e-4, rtol=1e-4)  # the grid pools to the feature


def test_onnx_runtime_gives_the_torch_numbers_and_only_for_frozen_inference(small, monkeypatch):
    from retrieval.models import onnx_tower

    x = torch.randn(3, 3, SIZE, SIZE)
    tower = small.clip.visual
    with torch.no_grad():
        fast_feats, fast_map = onnx_tower.run(tower, x, "features"), onnx_tower.run(tower, x, "fmap")
        monkeypatch.setenv("CXR_IMAGE_RUNTIME", "torch")
        assert onnx_tower.run(tower, x, "features") is None
        torch_feats, torch_map = small.image_features(x), tower.trunk.forward_features(x)
        monkeypatch.delenv("CXR_IMAGE_RUNTIME")
    torch.testing.assert_close(fast_feats, torch_feats, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(fast_map, torch_map, atol=1e-4, rtol=1e-4)
    assert onnx_tower.run(tower, x, "features") is None  # autograd on: PyTorch
    with torch.no_grad():
        tower.trunk.blocks[-1].requires_grad_(True)
        assert onnx_tower.run(tower, x, "features") is None  # a weight that trains: PyTorch
        tower.requires_grad_(False)
        before = onnx_tower.run(tower, x, "features")
        tower.trunk.conv_head.weight.mul_(0.5)  # changed in place: a new export, never the stale graph
        fresh = onnx_tower.run(tower, x, "features")
        torch.testing.assert_close(fresh, small.clip.encode_image(x), atol=1e-4, rtol=1e-4)
        tower.trunk.conv_head.weight.mul_(2.0)
        torch.testing.assert_close(onnx_tower.run(tower, x, "features"), before, atol=1e-5, rtol=1e-5)


def test_bad_items_raise_or_skip_by_one_rule(small, files):
    with pytest.raises(ImageReadError, match="broken.png"):
        small.encode_images(files)
    batches = list(stream_images(small, files, batch_size=5, on_error="skip"))
    assert [b.positions.tolist() for b in batches] == [[0, 1, 2, 3, 4], [5, 6]]
    assert batches[1].bad and batches[1].bad[0][0] == 7 and batches[1].bad[0][1]
    np.testing.assert_allclose(batches[1].values, _naive(small, files[5:7]), atol=1e-5)
    with pytest.raises(ValueError, match="on_error"):
        next(stream_images(small, files, on_error="ignore"))


def test_the_image_path_leaves_module_modes_as_they_were(small, files):
    small.train()
    small.clip.visual.eval()
    small.encode_images(files[:2])
    assert small.training and not small.clip.visual.training and small.projector.training
    small.eval()


def test_unfreeze_last_counts_cnn_stages_and_keeps_the_stem_frozen(small):
    counts = small.unfreeze_last(2, towers=("image",))
    assert counts == {"image": 2}
    trunk = small.clip.visual.trunk
    assert all(p.requires_grad for p in trunk.blocks[-1].parameters())
    assert all(p.requires_grad for p in trunk.conv_head.parameters())
    assert not any(p.requires_grad for p in trunk.blocks[4].parameters())
    assert not any(p.requires_grad for p in trunk.conv_stem.parameters())
    assert not any(p.requires_grad for p in trunk.bn1.parameters())
    small.freeze_towers()


def test_frozen_front_then_trained_back_equals_the_tower(small):
    from retrieval.models.tower_parts import split_cnn

    x = torch.randn(3, 3, SIZE, SIZE)
    with torch.no_grad():
        whole = small.image_features(x)
        for n in (1, 3, 7):
            front, back = split_cnn(small.clip.visual, n)
            torch.testing.assert_close(back(front(x)), whole, atol=1e-4, rtol=1e-4)
    assert split_cnn(small.clip.visual, 0) is None
    assert split_cnn(load_model("cxr-tiny").clip.visual, 1) is None  # a ViT is not cut


@pytest.mark.slow
def test_training_writes_an_image_store_that_skips_the_tower_only_where_valid(tmp_path, monkeypatch):
    from retrieval.models import feature_store
    from retrieval.training import train

    manifest = make_manifest(tmp_path / "data", 24, size=48)
    monkeypatch.setattr("retrieval.models.encoder.CXRModel.image_size", property(lambda self: SIZE))
    model = train(manifest, "cxr-small", tmp_path / "m", epochs=1, batch_size=8, show_progress=False).model
    assert (tmp_path / "m" / feature_store.IMAGE_STORE).is_file()
    import pandas as pd

    df = pd.read_parquet(manifest)
    seen = [str(tmp_path / "data" / p) for p, s in zip(df["image_path"], df["split"], strict=True) if s != "test"]
    unseen = [str(tmp_path / "data" / p) for p, s in zip(df["image_path"], df["split"], strict=True) if s == "test"]

    plain = load_model(tmp_path / "m")
    plain.source_dir = None  # no store: every image through the tower
    want = plain.encode_images(seen + unseen)

    stored = load_model(tmp_path / "m")
    ran = []
    features = stored.image_features
    monkeypatch.setattr(stored, "image_features", lambda px: (ran.append(len(px)), features(px))[1])
    np.testing.assert_allclose(stored.encode_images(seen + unseen, batch_size=5), want, atol=1e-5)
    assert sum(ran) == len(unseen)  # the training images skipped the tower

    ran.clear()  # an edited file gets a new key: it is encoded again
    os.utime(seen[0], ns=(1, 1))
    stored.encode_images(seen[:3])
    assert sum(ran) == 1

    ran.clear()  # a store made by other image-tower weights is ignored, never trusted
    with torch.no_grad():
        next(stored.clip.visual.parameters()).add_(0.01)
    stored.encode_images(seen[1:3])
    assert sum(ran) == 2
    assert model.fingerprint == load_model(tmp_path / "m").fingerprint


@pytest.mark.slow
def test_unfreeze_last_trains_on_cached_boundary_activations(tmp_path, monkeypatch):
    from retrieval.training import TrainConfig, Trainer

    manifest = make_manifest(tmp_path / "data", 24, size=48)
    monkeypatch.setattr("retrieval.models.encoder.CXRModel.image_size", property(lambda self: SIZE))
    config = TrainConfig(epochs=2, batch_size=8, unfreeze_last=1, show_progress=False, val_split=None)
    trainer = Trainer(manifest, "cxr-small", tmp_path / "m", config)
    before = {k: v.clone() for k, v in load_model("cxr-small").clip.visual.trunk.state_dict().items()}
    model = trainer.run().model
    assert trainer.tower_status["image"] == "last 1 blocks"
    assert list((tmp_path / "m" / "feature_cache").glob("front-train-*.safetensors"))
    after = model.clip.visual.trunk.state_dict()
    assert not torch.equal(after["blocks.6.0.conv_pw.weight"], before["blocks.6.0.conv_pw.weight"])
    assert torch.equal(after["blocks.5.0.conv_pw.weight"], before["blocks.5.0.conv_pw.weight"])
    assert torch.equal(after["conv_stem.weight"], before["conv_stem.weight"])
