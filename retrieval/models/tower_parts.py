"""The parts of a tower that training and the VLM reach into: its blocks, its stem, and (for a timm CNN such as
EfficientNet-Lite) the cut between a frozen front and a trained back, and the grid of its last feature map.

A CNN tower here is open_clip's `TimmModel` around a timm trunk with `conv_stem, bn1, blocks, conv_head, bn2`
(EfficientNet family): `trunk.blocks` is a Sequential of stages, and a stage is what `--unfreeze-last N` counts.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

# Parameter names that belong to a tower's input stem (kept frozen by `unfreeze_last`).
STEM_NAMES = (
    "conv1",
    "class_embedding",
    "positional_embedding",
    "ln_pre",
    "patch_embed",
    "cls_token",
    "pos_embed",
    "reg_token",
    "norm_pre",
    "embeddings",
    "token_embedding",
    "cls_emb",
    "conv_stem",  # timm CNNs: the stem conv and its norm
    "bn1",
)


def cnn_trunk(tower: nn.Module) -> nn.Module | None:
    """The timm EfficientNet-style trunk of an image tower, or None for any other tower (ViT, ...)."""
    trunk = getattr(tower, "trunk", None)
    parts = ("conv_stem", "bn1", "blocks", "conv_head", "bn2")
    return trunk if trunk is not None and all(hasattr(trunk, p) for p in parts) else None


def blocks(tower: nn.Module) -> list[nn.Module]:
    """The tower's repeated blocks: a CNN trunk's stages, else its longest ModuleList/Sequential of one class
    (transformer layers)."""
    trunk = cnn_trunk(tower)
    if trunk is not None:
        return list(trunk.blocks)
    best: list[nn.Module] = []
    for mod in tower.modules():
        if isinstance(mod, (nn.ModuleList, nn.Sequential)):
            children = list(mod.children())
            if len(children) >= 2 and len({type(c) for c in children}) == 1 and len(children) > len(best):
                best = children
    return best


def unfreeze_last(tower: nn.Module, n_blocks: int) -> int:
    """Make the last `n_blocks` blocks of an (already frozen) tower trainable, plus everything outside the blocks
    that is not stem (final norm, pooling, head). Returns how many blocks were unfrozen."""
    found = blocks(tower)
    chosen = found[len(found) - min(n_blocks, len(found)) :] if n_blocks else []
    for block in chosen:
        block.requires_grad_(True)
    if n_blocks:
        in_blocks = {id(p) for b in found for p in b.parameters()}
        for name, p in tower.named_parameters():
            if id(p) not in in_blocks and not any(s in name.split(".") for s in STEM_NAMES):
                p.requires_grad_(True)
    return len(chosen)


def split_cnn(tower: nn.Module, n_trained: int) -> tuple[Callable, Callable] | None:
    """(front, back) with back(front(pixels)) == tower(pixels) for a CNN tower whose last `n_trained` stages train:
    the front (stem + frozen stages) runs once and its activations are cached; epochs run only the back. None for
    towers that cannot be cut this way (the trainer then runs the whole tower)."""
    trunk = cnn_trunk(tower)
    if trunk is None or not 0 < n_trained <= len(trunk.blocks):
        return None
    k = len(trunk.blocks) - n_trained

    def front(pixels: torch.Tensor) -> torch.Tensor:
        return trunk.blocks[:k](trunk.bn1(trunk.conv_stem(channels_last(pixels))))

    def back(acts: torch.Tensor) -> torch.Tensor:
        x = trunk.bn2(trunk.conv_head(trunk.blocks[k:](channels_last(acts))))
        return tower.head(trunk.forward_head(x))

    return front, back


def channels_last(x: torch.Tensor) -> torch.Tensor:
    """A 4-D tensor in channels_last layout (1.3-1.6x faster depthwise convolutions on these CPUs)."""
    return x.contiguous(memory_format=torch.channels_last) if x.ndim == 4 else x


def cnn_grid_tokens(tower: nn.Module, pixels: torch.Tensor) -> torch.Tensor:
    """(B, 3, S, S) -> (B, h*w, C): the last feature map of a CNN tower (after its head conv and norm), row-major;
    its mean over tokens is the tower's pooled feature."""
    fmap = cnn_trunk(tower).forward_features(channels_last(pixels))
    return fmap.flatten(2).transpose(1, 2)

