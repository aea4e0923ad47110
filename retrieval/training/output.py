"""The output folder of a finished run: the model folder, the frozen towers' feature stores, `train_info.json`."""

from __future__ import annotations

from dataclasses import asdict
from typing import TYPE_CHECKING, Any

import torch

from retrieval.fileio import write_json_atomic
from retrieval.models import text_features

if TYPE_CHECKING:
    from retrieval.training.loop import Trainer


def save_trained(trainer: Trainer) -> dict[str, Any]:
    """Save the trained model and its feature stores to the trainer's folder; returns the run's summary."""
    model, out = trainer.model, trainer.out
    model.save(out)
    model.source_dir = out  # the returned model now reads its folder's feature stores
    splits = [sp for sp in (trainer.train_split, trainer.val_split) if sp is not None]
    save_feature_stores(trainer, splits)
    info = train_info(trainer)
    write_json_atomic(out / "train_info.json", info)
    from retrieval.models.bundle import write_checksums

    write_checksums(out)  # again, last: the feature stores and train_info.json are the folder's too
    return info


def save_feature_stores(trainer: Trainer, splits: list) -> None:
    """A frozen text tower's report features and a frozen image tower's image features, kept beside the model
    for `encode_texts` / `encode_images` (valid only for the tower weights they record)."""
    plan = trainer.plan
    texts = [sp for sp in splits if sp.text_feats is not None]
    if "text" in plan.tower_hash and texts:
        text_features.save_store(
            trainer.out,
            [t for sp in texts for t in sp.items.reports],
            torch.cat([sp.text_feats for sp in texts]),
            plan.tower_hash["text"],
        )
    images = [sp for sp in splits if sp.image_feats is not None]
    if plan.image_cut == "image" and images:
        from retrieval.models import feature_store

        feature_store.save_store(
            trainer.out / feature_store.IMAGE_STORE,
            feature_store.file_digests([p for sp in images for p in sp.items.image_paths]),
            torch.cat([sp.image_feats for sp in images]),
            plan.tower_hash["image"],
            trainer.precision,
        )


def train_info(trainer: Trainer) -> dict[str, Any]:
    """The run's summary: settings, towers, the epochs' history, the best epoch, what was skipped, timings."""
    state, train, val = trainer.state, trainer.train_split, trainer.val_split
    return {
        "base_model": trainer.model_name,
        "manifest": trainer.manifest_label,
        "config": asdict(trainer.config),
        "towers": trainer.tower_status,
        "precision": trainer.precision,
        "device": str(trainer.device),
        "best_epoch": state["best_epoch"],
        "best_metric": state["best_metric"],
        "monitor": trainer.monitor,
        "monitor_why": trainer.monitor_why,
        "stopped_early": state["stopped_early"],
        "epochs_run": state["epoch"],
        "history": state["history"],
        "train_studies": len(train.study_images),
        "train_images": len(train.items.image_ids),
        "val_images": 0 if val is None else len(val.items.image_ids),
        "skipped": train.items.skipped + ([] if val is None else val.items.skipped),
        "feature_cache_hits": trainer.cache_hits,
        "timings": trainer.timings,
        "fingerprint": str(getattr(trainer.model, "fingerprint", "")),
    }
