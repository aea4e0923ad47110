"""`TrainConfig`: everything that decides a retrieval training run, and which of it changes the result."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from typing import Any

from retrieval.errors import CXRError
from retrieval.losses import DEFAULT_LOSS_WEIGHTS, DEFAULT_POSITIVE_RULE, POSITIVE_RULES, check_loss_weights
from retrieval.models.token_cache import DEFAULT_GRID

MONITORS = ("auto", "i2r_map_label", "i2r_map_exact")
# auto: label mAP, unless the validation split's labels are so uniform that a random ranking already reaches this
# share of label-sharing pairs (covid-cxr: nearly every image is Pneumonia; label mAP sat at 0.97 from epoch 1 and
# stopped the run before it learned anything); then exact-study mAP, which can still move.
LABEL_CEILING = 0.8
# Fields that do not change the trained weights (epochs too: a run can be extended).
RUN_ONLY = (
    "epochs",
    "device",
    "precision",
    "feature_cache",
    "cache_dir",
    "num_workers",
    "show_progress",
    "token_cache",
    "token_grid",
)


@dataclass
class TrainConfig:
    """Everything that decides a training run. Fields marked run-only do not change the result."""

    epochs: int = 8
    batch_size: int = 64
    lr: float = 1e-3
    tower_lr: float | None = None  # None: lr for a tower trained from scratch, lr/10 for unfrozen pretrained blocks
    weight_decay: float = 1e-4
    loss_weights: dict[str, float] = field(default_factory=lambda: dict(DEFAULT_LOSS_WEIGHTS))  # losses.LOSS_TERMS
    positive_rule: str = DEFAULT_POSITIVE_RULE
    supcon_temperature: float = 0.1
    unfreeze_last: int = 0
    unfreeze_towers: tuple[str, ...] = ("image", "text")  # the towers `unfreeze_last` applies to
    augment: bool = False  # radiograph augmentation of the training images (augment.py); the tower runs each epoch
    image_tower: str = "auto"  # auto: train from scratch when the model says so (cxr-tiny); train | frozen
    seed: int = 0  # projector init and data order
    tower_seed: int = 0  # init of randomly initialised towers (cxr-tiny's image tower); fixed across seeds
    patience: int = 3
    monitor: str = "auto"
    train_split: str = "train"
    val_split: str | None = "val"
    max_train_studies: int | None = None  # a deterministic subset (first N studies), for quick runs
    # run-only
    device: str | None = None
    precision: str = "auto"  # auto = bf16 on CUDA, fp32 on CPU
    feature_cache: bool = True
    cache_dir: str | None = None
    num_workers: int = 0
    show_progress: bool = True
    token_cache: str | None = None  # a VLM token-cache folder: a frozen CNN tower's grid tokens are kept there
    token_grid: int | None = DEFAULT_GRID  # ... when they fit this grid (the VLM's visual_grid)

    def result_key(self) -> dict[str, Any]:
        """The fields that change the trained weights."""
        return {k: v for k, v in asdict(self).items() if k not in RUN_ONLY}

    def validate(self) -> None:
        """Raise CXRError for impossible settings; the loss weights become {term: weight} over every term."""
        if self.epochs < 1 or self.batch_size < 2:
            raise CXRError("epochs must be >= 1 and batch size >= 2")
        if self.positive_rule not in POSITIVE_RULES:
            raise CXRError(f"positive rule must be one of {', '.join(POSITIVE_RULES)}, got {self.positive_rule!r}")
        if self.monitor not in MONITORS:
            raise CXRError(f"monitor must be one of {', '.join(MONITORS)}, got {self.monitor!r}")
        try:
            self.loss_weights = check_loss_weights(self.loss_weights)
        except (ValueError, TypeError, AttributeError) as e:
            raise CXRError(f"loss weights: {e}") from None
        if self.unfreeze_last < 0:
            raise CXRError("unfreeze-last must be >= 0")
        self.unfreeze_towers = tuple(self.unfreeze_towers)
        if not set(self.unfreeze_towers) <= {"image", "text"}:
            raise CXRError(f"unfreeze towers must be image and/or text, got {', '.join(self.unfreeze_towers)}")
        if self.image_tower not in ("auto", "train", "frozen"):
            raise CXRError(f"image tower must be auto, train or frozen, got {self.image_tower!r}")


def make_config(config: TrainConfig | None = None, **overrides: Any) -> TrainConfig:
    """A validated copy of `config` (default: TrainConfig()) with `overrides` set."""
    out = TrainConfig(**{**asdict(config or TrainConfig()), **overrides})
    out.validate()
    return out


def run_key(config: TrainConfig, model_name: str, items: Any) -> str:
    """What a checkpoint must match to be resumed: the result-changing settings, the model, the train split."""
    from retrieval.training.data import items_hash

    h = hashlib.sha256()
    h.update(json.dumps(config.result_key(), sort_keys=True).encode())
    h.update(model_name.encode())
    h.update(items_hash(items, "text").encode())
    h.update("\n".join(items.image_ids).encode())
    return h.hexdigest()
