"""Retrieval training: fine-tune the projector (and optionally the towers): `train(manifest, model, out)`.

- Towers frozen by default; `unfreeze_last=N` unfreezes the last N blocks of each pretrained tower.
  `cxr-tiny` trains its image tower from scratch (its text tower stays frozen).
- Frozen towers' pooled features are computed once and cached in `out/feature_cache/` (safetensors), keyed
  by a hash of the tower's weights and of the split's content (image paths, sizes, mtimes; report texts), so
  the projector epochs never re-run a frozen tower, and the ablation arms can share one cache.
- One training item is a study: its report and one of its images (drawn per epoch), so the CLIP loss never
  sees two images of one study as negatives of each other.
- Seeded and deterministic: the epoch's order comes from a generator seeded by (seed, epoch); the global RNG
  state is saved with each checkpoint. Each epoch ends with an atomic checkpoint
  (`retrieval.training_checkpoint.Checkpoint`: safetensors weights, torch optimiser state loaded with
  weights_only=True, JSON state) and `train` resumes from it after a kill, reproducing the weights of an
  uninterrupted run.
- Each epoch is validated on the `val` split (image->report mAP, see retrieval.evaluate_retrieval) and training stops
  early after `patience` epochs without improvement; the best epoch's weights are what is saved.

Modules: `config` (TrainConfig), `initial_model` (the seeded model, what trains), `data` (a prepared split, the epoch's
batches), `feature_cache` (the frozen-feature cache), `task` (model + `logit_scale` + weighted loss terms),
`resume` (what the checkpoint holds, through the scheme both trainers use, `retrieval.training_checkpoint`), `loop`
(Trainer), `output` (the saved folder).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from retrieval.training.config import MONITORS, TrainConfig, make_config
from retrieval.training.initial_model import set_trainable, tower_modules
from retrieval.training.loop import CACHE_DIR, CHECKPOINT_DIR, Trainer, TrainResult

__all__ = [
    "CACHE_DIR",
    "CHECKPOINT_DIR",
    "MONITORS",
    "TrainConfig",
    "TrainResult",
    "Trainer",
    "set_trainable",
    "tower_modules",
    "train",
]


def train(
    manifest: Any,
    model_name: str = "cxr-small",
    out_dir: str | Path = "runs/cxr",
    config: TrainConfig | None = None,
    fresh: bool = False,
    on_epoch_end: Callable[[int, dict], None] | None = None,
    **overrides: Any,
) -> TrainResult:
    """Train `model_name` on the manifest's train split and save it to `out_dir` (a normal model folder that
    `load_model(out_dir)` reloads, plus `train_info.json`, `checkpoint/` and `feature_cache/`).

    Resumes from `out_dir/checkpoint` when it holds an unfinished run with the same settings (`fresh=True`
    starts over). `overrides` set TrainConfig fields, e.g. `train(m, "cxr-tiny", "out", epochs=3)`."""
    trainer = Trainer(manifest, model_name, out_dir, make_config(config, **overrides))
    return trainer.run(fresh=fresh, on_epoch_end=on_epoch_end)
