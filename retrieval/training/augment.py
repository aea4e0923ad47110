"""Augmentation that suits radiographs, for training a tower on real images (`cxr train --augment`).

Small rotations (a patient is never positioned perfectly), crops that keep most of the film (collimation and
framing vary), and contrast and gamma changes (exposure, processing and the display curve vary between machines).
Never a left-right flip: the sides of a chest film carry meaning (the heart is on the patient's left; a finding's
side is part of the finding). It runs on the grey HxW [0, 1] array before the tower's own transform (resize, pad,
normalise), from a generator the trainer seeds per (seed, epoch, batch), so a resumed run draws the same.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass(frozen=True)
class RadiographAugment:
    """One random draw per call: rotation, crop, contrast, gamma (in that order); no flips."""

    max_rotate: float = 7.0  # degrees, either way
    min_crop: float = 0.85  # each side keeps at least this share of the film
    contrast: tuple[float, float] = (0.8, 1.25)  # factor around the image mean
    gamma: tuple[float, float] = (0.8, 1.25)  # log-uniform exponent of the display curve

    def __call__(self, image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        from torchvision.transforms.v2 import InterpolationMode
        from torchvision.transforms.v2 import functional as tvf

        t = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32))[None]
        angle = float(rng.uniform(-self.max_rotate, self.max_rotate))
        t = tvf.rotate(t, angle, interpolation=InterpolationMode.BILINEAR, fill=0.0)
        h, w = t.shape[-2:]
        ch, cw = (max(1, round(n * rng.uniform(self.min_crop, 1.0))) for n in (h, w))
        top, left = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
        t = t[:, top : top + ch, left : left + cw]
        factor = float(rng.uniform(*self.contrast))
        mean = t.mean()
        t = ((t - mean) * factor + mean).clamp(0.0, 1.0)
        exponent = float(np.exp(rng.uniform(np.log(self.gamma[0]), np.log(self.gamma[1]))))
        return (t**exponent)[0].numpy()
