"""`Trainer`: one retrieval training run (or resume) to the end: setup, epochs, validation, checkpoints."""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from retrieval.data.split_items import SplitItems, split_items
from retrieval.errors import CXRError, ManifestError
from retrieval.fileio import clean_temporaries
from retrieval.progress import console, make_progress
from retrieval.retrieval_metrics import mean_average_precision, overlap_matrix, ranked_relevance
from retrieval.training.config import LABEL_CEILING, TrainConfig, run_key
from retrieval.training.data import PreparedSplit, epoch_batches, finish_split
from retrieval.training.feature_cache import SplitFeatures, plan_features
from retrieval.training.initial_model import build_model, scratch_towers, set_train_modes, set_trainable
from retrieval.training.resume import resume, save_epoch
from retrieval.training.task import RetrievalTask
from retrieval.training_checkpoint import Checkpoint

CHECKPOINT_DIR = "checkpoint"
CACHE_DIR = "feature_cache"


@dataclass
class TrainResult:
    """What `train` returns: the trained model (the best epoch's weights, reading its saved folder's feature
    stores), the run's summary (`train_info.json`) and the folder it was saved to."""

    model: nn.Module
    info: dict[str, Any]
    out_dir: Path


class Trainer:
    """One training run; see `retrieval.training`. Use `train(...)` unless you need the pieces."""

    def __init__(self, manifest: Any, model_name: str, out_dir: str | Path, config: TrainConfig):
        from retrieval.data.manifest import read_manifest
        from retrieval.device import resolve_device, resolve_precision

        config.validate()
        self.config = config
        self.model_name = model_name
        self.out = Path(out_dir)
        self.device = resolve_device(config.device)
        self.precision = resolve_precision(config.precision, self.device)
        self.df = manifest if not isinstance(manifest, (str, Path)) else read_manifest(manifest)
        self.manifest_label = str(manifest) if isinstance(manifest, (str, Path)) else "<DataFrame>"
        self.timings: dict[str, float] = {}
        self.checkpoint = Checkpoint(self.out / CHECKPOINT_DIR)

    @property
    def cache_hits(self) -> dict[str, bool]:
        return self.features.hits

    def setup(self) -> nn.Module:
        """Load the model (seeded), freeze/unfreeze its towers, plan the feature cache.
        After this, `embed(split)` gives the untrained (zero-shot) model's embeddings."""
        cfg = self.config
        self.model = build_model(self.model_name, cfg.tower_seed, cfg.seed, self.device)
        self.scratch = scratch_towers(self.model, cfg.image_tower)
        self.tower_status = set_trainable(self.model, self.scratch, cfg.unfreeze_last, cfg.unfreeze_towers)
        self.plan = plan_features(self.model, self.scratch, cfg.unfreeze_last, cfg.augment)
        cache_dir = Path(cfg.cache_dir) if cfg.cache_dir else self.out / CACHE_DIR
        self.features = SplitFeatures(self.model, self.plan, cfg, self.device, self.precision, cache_dir)
        clean_temporaries(self.out, self.checkpoint.folder, cache_dir)  # what a killed run left behind
        return self.model

    def prepare(self, split: str, max_studies: int | None = None) -> PreparedSplit | None:
        """A split through the feature cache; None when it has no usable rows (an error for the train split)."""
        t0 = time.perf_counter()
        try:
            items = split_items(self.df, split)
        except ManifestError:
            if split == self.config.train_split:
                raise
            return None
        prepared = finish_split(self.features.prepare(items, split), max_studies)
        self.timings[f"prepare_{split}_s"] = round(time.perf_counter() - t0, 3)
        return prepared

    def run(self, fresh: bool = False, on_epoch_end: Callable[[int, dict], None] | None = None) -> TrainResult:
        """Train (or resume) to the end, restore the best epoch's weights, save the model folder."""
        from retrieval.training.output import save_trained

        cfg = self.config
        t_start = time.perf_counter()
        self.setup()
        if fresh and self.checkpoint.folder.exists():
            shutil.rmtree(self.checkpoint.folder)
        self.train_split = self.prepare(cfg.train_split, cfg.max_train_studies)
        self.val_split = self.prepare(cfg.val_split) if cfg.val_split else None
        self.monitor, self.monitor_why = choose_monitor(cfg.monitor, self.val_split)
        if len(self.train_split.study_images) < 2:
            raise CXRError(f"split {cfg.train_split!r} has fewer than 2 usable studies")
        self.task = RetrievalTask(self.model, cfg.loss_weights, cfg.positive_rule, cfg.supcon_temperature)
        self.optimizer = self.task.optimizer(self.scratch, cfg.lr, cfg.tower_lr, cfg.weight_decay)
        self.key = run_key(cfg, self.model_name, self.train_split.items)
        state, best = resume(self.checkpoint, self.task, self.optimizer, self.key)
        if state["epoch"]:
            console.print(f"resuming {self.out} after epoch {state['epoch']}")
        epoch_times = []
        while state["epoch"] < cfg.epochs and not state["stopped_early"]:
            state, best, train_s = self._epoch(state, best)
            epoch_times.append(train_s)
            if on_epoch_end is not None:
                on_epoch_end(state["epoch"], state)
        if best is not None:
            self.task.load_trainable_state(best)
        self.state = state
        self.timings["epoch_s_mean"] = round(float(np.mean(epoch_times)), 3) if epoch_times else None
        self.timings["total_s"] = round(time.perf_counter() - t_start, 3)
        self.info = save_trained(self)
        return TrainResult(self.model, self.info, self.out)

    def _epoch(self, state: dict[str, Any], best: dict | None) -> tuple[dict[str, Any], dict | None, float]:
        """Train one epoch, validate, update the early-stopping state, commit a checkpoint."""
        cfg, epoch = self.config, state["epoch"]
        t0 = time.perf_counter()
        losses = self._train_epoch(epoch)
        train_s = time.perf_counter() - t0
        val = self.validate(self.val_split) if self.val_split is not None else {}
        metric = val.get(self.monitor)
        improved = metric is not None and (state["best_metric"] is None or metric > state["best_metric"])
        if improved or self.val_split is None:
            state["best_metric"], state["best_epoch"], state["bad_epochs"] = metric, epoch + 1, 0
            best = self.task.trainable_state()
        else:
            state["bad_epochs"] += 1
        state["epoch"] = epoch + 1
        state["history"].append({"epoch": epoch + 1, "train_s": round(train_s, 3), **losses, **val})
        if state["bad_epochs"] >= cfg.patience:
            state["stopped_early"] = True
        state = save_epoch(
            self.checkpoint, self.task, self.optimizer, state, best_is_now=improved or not self.val_split
        )
        line = ", ".join(f"{k} {v:.4f}" for k, v in {**losses, **val}.items())
        console.print(f"epoch {epoch + 1}/{cfg.epochs} ({train_s:.1f}s): {line}")
        return state, best, train_s

    def _train_epoch(self, epoch: int) -> dict[str, float]:
        from retrieval.device import autocast

        set_train_modes(self.model)
        split, sums = self.train_split, {}
        batches = epoch_batches(split.study_images, self.config.seed, epoch, self.config.batch_size)
        with make_progress(disable=not self.config.show_progress, transient=True) as progress:
            task = progress.add_task(f"epoch {epoch + 1}/{self.config.epochs}", total=len(batches), unit="batches")
            for b, (image_idx, study_idx) in enumerate(batches):
                labels = split.labels[study_idx].to(self.device)
                rng = np.random.default_rng([self.config.seed, epoch, b])  # augmentation draws (when it augments)
                with autocast(self.device, self.precision):
                    inputs = self.task.outputs(
                        self.features.images(split, image_idx, rng), self.features.texts(split, study_idx), labels
                    )
                out = self.task.loss(inputs)
                self.optimizer.zero_grad(set_to_none=True)
                out["loss"].backward()
                self.optimizer.step()
                self.task.clamp_logit_scale_()
                for k, v in out.items():
                    sums[k] = sums.get(k, 0.0) + float(v.detach())
                progress.advance(task)
        n = max(1, len(batches))
        return {k: round(v / n, 5) for k, v in sums.items()}

    @torch.no_grad()
    def project_split(self, split: PreparedSplit) -> tuple[np.ndarray, np.ndarray]:
        """(image, report) embeddings of a prepared split with the current weights (eval mode)."""
        from retrieval.device import autocast

        self.model.eval()
        bs = max(self.config.batch_size, 64)
        imgs, txts = [], []
        n_img, n_txt = len(split.items.image_ids), len(split.items.reports)
        with autocast(self.device, self.precision):
            for start in range(0, n_img, bs):
                idx = list(range(start, min(n_img, start + bs)))
                imgs.append(self.model.project_images(self.features.images(split, idx)).float().cpu())
            for start in range(0, n_txt, bs):
                idx = list(range(start, min(n_txt, start + bs)))
                txts.append(self.model.project_texts(self.features.texts(split, idx)).float().cpu())
        return torch.cat(imgs).numpy(), torch.cat(txts).numpy()

    def embed(self, split: str) -> tuple[SplitItems, np.ndarray, np.ndarray]:
        """Items and (image, report) embeddings of any manifest split, through the feature cache."""
        prepared = self.prepare(split)
        if prepared is None:
            raise CXRError(f"split {split!r} has no usable rows")
        img, txt = self.project_split(prepared)
        return prepared.items, img, txt

    def validate(self, split: PreparedSplit) -> dict[str, float]:
        """image->report mAP (label and exact) of the current weights on `split`."""
        img, txt = self.project_split(split)
        scores = img @ txt.T
        items = split.items
        exact = items.image_study[:, None] == np.arange(len(items.study_ids))[None, :]
        label = overlap_matrix(items.image_labels, items.study_labels)
        return {
            "i2r_map_label": round(mean_average_precision(ranked_relevance(scores, label)), 5),
            "i2r_map_exact": round(mean_average_precision(ranked_relevance(scores, exact)), 5),
        }


def choose_monitor(monitor: str, val: PreparedSplit | None) -> tuple[str, str]:
    """(the validation metric early stopping watches, why): `auto` picks label mAP unless the split's share of
    label-sharing image-report pairs (a random ranking's label precision) is at least LABEL_CEILING, where label
    mAP starts at its ceiling and cannot move; then exact-study mAP."""
    if monitor != "auto":
        return monitor, "chosen"
    if val is None:
        return "i2r_map_label", "no validation split"
    chance = float(overlap_matrix(val.items.image_labels, val.items.study_labels).mean())
    if chance >= LABEL_CEILING:
        return "i2r_map_exact", f"{chance:.0%} of validation image-report pairs share a label: label mAP cannot move"
    return "i2r_map_label", f"{chance:.0%} of validation image-report pairs share a label"
