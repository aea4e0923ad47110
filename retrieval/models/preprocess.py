"""Image preprocessing for the image towers: a grey HxW [0, 1] array -> a normalised 3xSxS tensor.

The whole radiograph is kept: the longest side is resized to S (aspect ratio kept, antialiased) and the short side
is padded symmetrically with black (0 before normalisation). Centre-cropping would cut off apices or costophrenic
angles of portrait films. The grey channel is replicated to three channels and normalised with the tower's mean/std.
`letterbox` is that geometry without torch: the ONNX Runtime path (models/onnx_embedder.py) resizes with PIL on it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import torch

INTERPOLATIONS = ("bilinear", "bicubic", "nearest", "area")


def letterbox(image: np.ndarray, size: int) -> tuple[np.ndarray, int, int, int, int]:
    """An image as the grey HxW float32 array the towers read (an RGB(A) array: the mean of its colours) and where
    it goes in the `size` x `size` square: (array, new height, new width, top, left), the longest side resized to
    `size` and the other centred. ValueError for an array that is empty or not 2-D."""
    a = np.asarray(image, dtype=np.float32)
    if a.ndim == 3 and a.shape[-1] in (3, 4):  # tolerate an RGB(A) array: average the colour channels
        a = a[..., :3].mean(axis=-1)
    if a.ndim != 2 or a.shape[0] == 0 or a.shape[1] == 0:
        raise ValueError(f"expected a non-empty HxW grey array, got shape {a.shape}")
    h, w = a.shape
    scale = size / max(h, w)
    nh, nw = max(1, round(h * scale)), max(1, round(w * scale))
    return a, nh, nw, (size - nh) // 2, (size - nw) // 2


class GreyImageTransform:
    """Picklable callable (safe to send to DataLoader workers): np.ndarray HxW float [0,1] -> Tensor(3, S, S)."""

    def __init__(
        self,
        size: int,
        mean: Sequence[float] = (0.5, 0.5, 0.5),
        std: Sequence[float] = (0.25, 0.25, 0.25),
        interpolation: str = "bilinear",
    ):
        if interpolation not in INTERPOLATIONS:
            raise ValueError(f"interpolation must be one of {INTERPOLATIONS}, got {interpolation!r}")
        self.size = int(size)
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)
        self.interpolation = interpolation

    def __repr__(self) -> str:
        return (
            f"GreyImageTransform(size={self.size}, mean={self.mean}, std={self.std}, "
            f"interpolation={self.interpolation!r}, resize='longest side + pad')"
        )

    def __call__(self, image: np.ndarray) -> torch.Tensor:
        import torch
        import torch.nn.functional as F

        a, nh, nw, top, left = letterbox(image, self.size)
        t = torch.from_numpy(np.ascontiguousarray(a))[None, None]
        if (nh, nw) != a.shape:
            kwargs = {}
            if self.interpolation in ("bilinear", "bicubic"):
                kwargs = {"align_corners": False, "antialias": True}
            t = F.interpolate(t, size=(nh, nw), mode=self.interpolation, **kwargs)
        t = t.clamp_(0.0, 1.0)[0, 0]
        out = torch.zeros(self.size, self.size, dtype=torch.float32)
        out[top : top + nh, left : left + nw] = t
        mean = torch.tensor(self.mean, dtype=torch.float32)[:, None, None]
        std = torch.tensor(self.std, dtype=torch.float32)[:, None, None]
        return (out.expand(3, -1, -1) - mean) / std
