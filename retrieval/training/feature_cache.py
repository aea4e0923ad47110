"""The frozen-feature cache: what a frozen tower (or a CNN's frozen front) gives for each image and report is
computed once into `feature_cache/` (safetensors), keyed by the tower weights and the split's content, and
epochs read it instead of re-running the tower."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from retrieval.data.split_items import SplitItems
from retrieval.errors import CXRError
from retrieval.models import text_features
from retrieval.models.saved_model import fingerprint_state
from retrieval.training.augment import RadiographAugment
from retrieval.training.config import TrainConfig
from retrieval.training.data import ImageSource, PreparedSplit, decode_images, drop_unreadable, items_hash
from retrieval.training.initial_model import tower_frozen, tower_modules

log = logging.getLogger(__name__)


@dataclass
class FeaturePlan:
    """What the cache holds. `image_cut`: "image" (a frozen tower's pooled features), "front" (a CNN's
    activations at the frozen boundary under `unfreeze_last`, so epochs run only `image_back`) or None."""

    tower_hash: dict[str, str] = field(default_factory=dict)  # the frozen towers' weights (and "image_front")
    image_cut: str | None = None
    image_forward: Any = None  # encode_image_items' `output` for the cached image pass
    image_back: nn.Module | None = None


def plan_features(model: nn.Module, scratch: Sequence[str], unfreeze_last: int, augment: bool = False) -> FeaturePlan:
    """The plan for a model whose towers are set trainable (`towers.set_trainable`). With `augment`, no image
    features are cached: every epoch runs the tower on freshly augmented pixels."""
    from retrieval.models.tower_parts import split_cnn

    towers = tower_modules(model)
    plan = FeaturePlan({k: fingerprint_state(t.state_dict()) for k, t in towers.items() if tower_frozen(t)})
    tower = towers["image"]
    if augment:
        return plan
    if tower_frozen(tower):
        plan.image_cut, plan.image_forward = "image", "features"
        plan.tower_hash["image_front"] = plan.tower_hash["image"]
        return plan
    parts = None if "image" in scratch else split_cnn(tower, unfreeze_last)
    if parts is not None:
        front, plan.image_back = parts
        plan.image_cut, plan.image_forward = "front", lambda model, pixels: front(pixels)
        initial = fingerprint_state(tower.state_dict())  # the front never trains: its start state is its state
        plan.tower_hash["image_front"] = f"{initial}-front{unfreeze_last}"
    return plan


def load_cached(path: Path, key: dict[str, str]) -> torch.Tensor | None:
    """The features stored at `path` when its metadata matches `key` (a corrupt file is never trusted)."""
    from safetensors import safe_open

    if path.is_file():
        try:
            with safe_open(str(path), framework="pt") as f:
                if f.metadata() == key:
                    return f.get_tensor("features")
        except Exception:  # recomputed
            pass
    return None


def store_cached(path: Path, key: dict[str, str], feats: torch.Tensor) -> torch.Tensor:
    from safetensors.torch import save_file

    from retrieval.fileio import atomic_path

    feats = feats.contiguous()
    with atomic_path(path) as tmp:
        save_file({"features": feats}, str(tmp), metadata=key)
    return feats


def pooled_and_tokens(model: nn.Module, pixels: torch.Tensor) -> torch.Tensor:
    """(B, 1 + N, D): a CNN tower's pooled feature (the mean of its last feature map), then that map's N tokens."""
    tokens = model.image_tokens(pixels).float()
    return torch.cat([tokens.mean(dim=1, keepdim=True), tokens], dim=1)


class SplitFeatures:
    """Prepares splits through the cache (`prepare`) and gives a batch's tower features (`images`, `texts`)."""

    def __init__(self, model: nn.Module, plan: FeaturePlan, config: TrainConfig, device, precision: str, cache_dir):
        self.model, self.plan, self.config = model, plan, config
        self.device, self.precision, self.cache_dir = device, precision, Path(cache_dir)
        self.transform = model.image_transform()
        self.hits: dict[str, bool] = {}

    def prepare(self, items: SplitItems, split: str) -> PreparedSplit:
        """The split's cached features (image and/or text), or its decoded pixels when a tower trains on them."""
        cfg = self.config
        out = PreparedSplit(items=items, labels=torch.zeros(0), study_images=[])
        image_tower = tower_modules(self.model)["image"]
        if cfg.feature_cache and self.plan.image_cut is not None:
            out.items, out.image_feats = self._image_features(items, split)
        elif not tower_frozen(image_tower) or not cfg.feature_cache or cfg.augment:
            size = int(getattr(self.model, "image_size", 224))
            out.items, out.decoded = decode_images(items, size, cfg.show_progress, f"decode {split}")
        if cfg.feature_cache and "text" in self.plan.tower_hash:
            out.text_feats = self._text_features(out.items, split)
        return out

    def _image_features(self, items: SplitItems, split: str) -> tuple[SplitItems, torch.Tensor]:
        cfg, kind = self.config, self.plan.image_cut
        key = {
            "kind": kind,
            "tower": self.plan.tower_hash["image_front"],
            "items": items_hash(items, "image"),
            "image_size": str(getattr(self.model, "image_size", "")),
        }
        path = self.cache_dir / f"{kind}-{split}-{key['tower'][:12]}-{key['items'][:12]}.safetensors"
        feats = load_cached(path, key)
        self.hits[f"image/{split}"] = feats is not None
        if feats is not None:
            if feats.shape[0] != len(items.image_ids):  # images that were unreadable when cached
                raise CXRError(f"{path}: cache does not match the split; delete it and retry")
            return items, feats
        from retrieval.models.image_stream import encode_image_items

        keep_tokens = kind == "image" and cfg.token_cache is not None and getattr(self.model, "cnn_tower", False)
        feats, kept, bad = encode_image_items(
            self.model,
            items.image_paths,
            output=pooled_and_tokens if keep_tokens else self.plan.image_forward,
            batch_size=max(cfg.batch_size, 64),
            num_workers=cfg.num_workers,
            precision=self.precision,
            on_error="skip",
            progress=f"image {kind} ({split})" if cfg.show_progress else None,
        )
        items.skipped.extend(f"{items.image_ids[i]}: {reason}" for i, reason in bad)
        if keep_tokens:  # the feature map's mean is the pooled feature; its grid is what the VLM reads
            feats = self._keep_tokens([items.image_paths[i] for i in kept.tolist()], feats)
        feats = store_cached(path, key, feats.to(torch.float16) if kind == "front" else feats)
        return drop_unreadable(items, {i for i, _ in bad}), feats

    def _text_features(self, items: SplitItems, split: str) -> torch.Tensor:
        key = {"kind": "text", "tower": self.plan.tower_hash["text"], "items": items_hash(items, "text")}
        path = self.cache_dir / f"text-{split}-{key['tower'][:12]}-{key['items'][:12]}.safetensors"
        feats = load_cached(path, key)
        self.hits[f"text/{split}"] = feats is not None
        if feats is None:
            feats = store_cached(path, key, self._report_features(items.reports, f"text features ({split})"))
        return feats

    def _keep_tokens(self, paths: list[str], pooled_and_tokens: torch.Tensor) -> torch.Tensor:
        """Add the grid tokens (rows 1: of each image's output) to the token cache; return the pooled features."""
        from retrieval.models.token_cache import TokenCache

        tokens = pooled_and_tokens[:, 1:]
        grid = self.config.token_grid
        if grid is None or tokens.shape[1] <= grid * grid:  # tokens the VLM would read as they are (no pooling)
            TokenCache(self.config.token_cache, self.plan.tower_hash["image"], grid).add(paths, tokens)
        else:
            log.info("token cache: %d tokens per image exceed the %dx%d grid; not kept", tokens.shape[1], grid, grid)
        return pooled_and_tokens[:, 0].contiguous()

    def _report_features(self, reports: Sequence[str], desc: str) -> torch.Tensor:
        """Text-tower features of each report (once per distinct text, in batches of similar length)."""
        featurize: Callable = lambda chunk: self.model.text_features(self.model.tokenize(chunk).to(self.device))  # noqa: E731
        return text_features.pooled_features(
            featurize, reports, max(self.config.batch_size, 64), show_progress=self.config.show_progress, desc=desc
        )

    def images(self, split: PreparedSplit, idx: Sequence[int], rng: np.random.Generator | None = None) -> torch.Tensor:
        """The image features the projector reads for images `idx`: cached (through the trained back of a cut
        CNN), or the tower run on their pixels (augmented from `rng` when the run augments and `rng` is given:
        training batches)."""
        if split.image_feats is not None:
            feats = split.image_feats[list(idx)].to(self.device)
            return self.plan.image_back(feats.float()) if self.plan.image_back is not None else feats
        augment = RadiographAugment() if self.config.augment and rng is not None else None
        source = ImageSource(split.items.image_paths, self.transform, split.decoded, augment, rng)
        return self.model.image_features(torch.stack([source[i] for i in idx]).to(self.device))

    def texts(self, split: PreparedSplit, study_idx: Sequence[int]) -> torch.Tensor:
        """The text features of studies `study_idx`: cached, or the tower run on their reports."""
        if split.text_feats is not None:
            return split.text_feats[list(study_idx)].to(self.device)
        tokens = self.model.tokenize([split.items.reports[i] for i in study_idx])
        return self.model.text_features(tokens.to(self.device))
