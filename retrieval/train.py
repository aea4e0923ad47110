"""Fine-tune the projector (and optionally the towers) with the composite loss: `train(manifest, model, out)`.

- Towers frozen by default; `unfreeze_last=N` unfreezes the last N blocks of each pretrained tower.
  `cxr-tiny` trains its image tower from scratch (its text tower stays frozen).
- Frozen towers' pooled features are computed once and cached in `out/feature_cache/` (safetensors), keyed
  by a hash of the tower's weights and of the split's content (image paths, sizes, mtimes; report texts), so
  the projector epochs never re-run a frozen tower, and the ablation arms can share one cache.
- One training item is a study: its report and one of its images (drawn per epoch), so the CLIP loss never
  sees two images of one study as negatives of each other.
- Seeded and deterministic: the epoch's order comes from a generator seeded by (seed, epoch); the global RNG
  state is saved with each checkpoint. Each epoch ends with an atomic checkpoint (safetensors weights, torch
  optimiser state loaded with weights_only=True, JSON state) and `train` resumes from it after a kill,
  reproducing the weights of an uninterrupted run.
- Each epoch is validated on the `val` split (image->report mAP, see retrieval.evaluate) and training stops
  early after `patience` epochs without improvement; the best epoch's weights are what is saved.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from retrieval.errors import CXRError, ImageReadError, ManifestError
from retrieval.evaluate import (
    SplitItems,
    mean_average_precision,
    overlap_matrix,
    ranked_relevance,
    split_items,
)
from retrieval.fileio import atomic_path, clean_temporaries, write_json_atomic
from retrieval.losses import DEFAULT_POSITIVE_RULE, POSITIVE_RULES, CompositeLoss
from retrieval.models import text_features
from retrieval.models.checkpoint import fingerprint_state
from retrieval.models.token_cache import DEFAULT_GRID
from retrieval.progress import console, make_progress

log = logging.getLogger(__name__)

MONITORS = ("i2r_map_label", "i2r_map_exact")
# A pristine copy of the last freshly built model, so repeated runs in one process (ablations, tests) skip the
# slow tower construction; copies are deep, so training never touches it.
_PRISTINE: dict[tuple[str, int, str], nn.Module] = {}
CHECKPOINT_DIR = "checkpoint"
CACHE_DIR = "feature_cache"


@dataclass
class TrainConfig:
    """Everything that decides a training run. Fields marked run-only do not change the result."""

    epochs: int = 8
    batch_size: int = 64
    lr: float = 1e-3
    tower_lr: float | None = None  # None: lr for a tower trained from scratch, lr/10 for unfrozen pretrained blocks
    weight_decay: float = 1e-4
    loss_weights: tuple[float, float, float] = (1.0, 1.0, 1.0)  # clip, supcon, bce
    positive_rule: str = DEFAULT_POSITIVE_RULE
    supcon_temperature: float = 0.1
    unfreeze_last: int = 0
    image_tower: str = "auto"  # auto: train from scratch when the model says so (cxr-tiny); train | frozen
    seed: int = 0  # projector init and data order
    tower_seed: int = 0  # init of randomly initialised towers (cxr-tiny's image tower); fixed across seeds
    patience: int = 3
    monitor: str = "i2r_map_label"
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
        """The fields that change the trained weights (epochs excluded: a run can be extended)."""
        run_only = {
            "epochs",
            "device",
            "precision",
            "feature_cache",
            "cache_dir",
            "num_workers",
            "show_progress",
            "token_cache",
            "token_grid",
        }
        out = {k: v for k, v in asdict(self).items() if k not in run_only}
        out["loss_weights"] = list(self.loss_weights)
        return out

    def validate(self) -> None:
        """Raise CXRError for impossible settings."""
        if self.epochs < 1 or self.batch_size < 2:
            raise CXRError("epochs must be >= 1 and batch size >= 2")
        if self.positive_rule not in POSITIVE_RULES:
            raise CXRError(f"positive rule must be one of {', '.join(POSITIVE_RULES)}, got {self.positive_rule!r}")
        if self.monitor not in MONITORS:
            raise CXRError(f"monitor must be one of {', '.join(MONITORS)}, got {self.monitor!r}")
        if len(self.loss_weights) != 3 or min(self.loss_weights) < 0 or max(self.loss_weights) == 0:
            raise CXRError(f"loss weights must be three numbers >= 0, one > 0; got {self.loss_weights}")
        if self.unfreeze_last < 0:
            raise CXRError("unfreeze-last must be >= 0")
        if self.image_tower not in ("auto", "train", "frozen"):
            raise CXRError(f"image tower must be auto, train or frozen, got {self.image_tower!r}")


# ------------------------------------------------------------------------------------------ model parts


def tower_modules(model: nn.Module) -> dict[str, nn.Module]:
    """{"image": ..., "text": ...}: the model's towers (everything else — projectors, head — always trains)."""
    towers = getattr(model, "towers", None)
    if not callable(towers):
        raise CXRError(f"model {type(model).__name__} does not expose its towers (CXRModel.towers())")
    return dict(towers())


def set_trainable(model: nn.Module, scratch_towers: Sequence[str], unfreeze_last: int) -> dict[str, str]:
    """Freeze the pretrained towers except their last `unfreeze_last` blocks and head (`CXRModel.unfreeze_last`,
    the stem stays frozen); towers named in `scratch_towers` train fully; projectors and head always train.
    Returns {tower: "frozen" | "trained (from scratch)" | "last N blocks"}."""
    pretrained = [k for k in ("image", "text") if k not in scratch_towers]
    counts = model.unfreeze_last(unfreeze_last, towers=pretrained) if pretrained else {}
    if not pretrained:
        model.freeze_towers()
    towers = tower_modules(model)
    status = {}
    for kind, tower in towers.items():
        if kind in scratch_towers:
            tower.requires_grad_(True)
            status[kind] = "trained (from scratch)"
        elif counts.get(kind):
            status[kind] = f"last {counts[kind]} blocks"
        else:
            status[kind] = "frozen"
    return status


def tower_frozen(tower: nn.Module) -> bool:
    """True when no parameter of the tower is trained."""
    return not any(p.requires_grad for p in tower.parameters())


def _set_modes(model: nn.Module) -> None:
    """eval() everywhere (frozen towers: no dropout, fixed BN), train() on modules whose weights all train."""
    model.eval()
    for mod in model.modules():
        params = list(mod.parameters(recurse=True))
        if params and all(p.requires_grad for p in params):
            mod.train()


def trainable_state(model: nn.Module, loss: nn.Module) -> dict[str, torch.Tensor]:
    """What training changes: trained parameters, all buffers (e.g. BatchNorm stats), loss parameters."""
    keep = {n for n, p in model.named_parameters() if p.requires_grad} | {n for n, _ in model.named_buffers()}
    out = {f"model.{k}": v.detach().cpu().clone().contiguous() for k, v in model.state_dict().items() if k in keep}
    out.update({f"loss.{k}": v.detach().cpu().clone().contiguous() for k, v in loss.state_dict().items()})
    return out


def load_trainable_state(model: nn.Module, loss: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Inverse of `trainable_state` (strict on the keys it holds)."""
    m = {k[6:]: v for k, v in state.items() if k.startswith("model.")}
    lo = {k[5:]: v for k, v in state.items() if k.startswith("loss.")}
    missing = set(m) - set(model.state_dict())
    if missing:
        raise CXRError(f"checkpoint holds weights the model lacks: {sorted(missing)[:3]}")
    model.load_state_dict(m, strict=False)
    loss.load_state_dict(lo, strict=True)


# ------------------------------------------------------------------------------------------ data


def _items_hash(items: SplitItems, kind: str) -> str:
    h = hashlib.sha256(kind.encode())
    if kind == "image":
        for image_id, path in zip(items.image_ids, items.image_paths, strict=True):
            st = Path(path).stat()
            h.update(f"{image_id}\0{path}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    else:
        for text in items.reports:
            h.update(text.encode() + b"\0")
    return h.hexdigest()


class _ImageSource(torch.utils.data.Dataset):
    """Pixels of the split's images: read from disk (or the in-memory decoded copy) and transformed."""

    def __init__(self, paths: Sequence[str], transform: Callable, decoded: list[np.ndarray] | None = None):
        self.paths = list(paths)
        self.transform = transform
        self.decoded = decoded

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> torch.Tensor:
        if self.decoded is not None:
            arr = self.decoded[i].astype(np.float32) / 255.0
        else:
            from retrieval.data.image_io import read_image

            arr = read_image(self.paths[i])
        return self.transform(arr)


def _decode_small(path: str, size: int) -> np.ndarray:
    """The image as uint8 grey with its short side resized to `size` (kept in RAM for tower training)."""
    from PIL import Image

    from retrieval.data.image_io import read_image

    arr = read_image(path)
    h, w = arr.shape
    scale = size / min(h, w)
    img = Image.fromarray(np.clip(arr * 255.0 + 0.5, 0, 255).astype(np.uint8))
    if abs(scale - 1.0) > 1e-6:
        img = img.resize((max(1, round(w * scale)), max(1, round(h * scale))), Image.BILINEAR)
    return np.asarray(img, dtype=np.uint8)


def drop_unreadable(items: SplitItems, bad: set[int]) -> SplitItems:
    """The items without the images at positions `bad` (studies left without images are dropped too)."""
    if not bad:
        return items
    keep = [i for i in range(len(items.image_ids)) if i not in bad]
    used = sorted({int(items.image_study[i]) for i in keep})
    remap = {s: j for j, s in enumerate(used)}
    return SplitItems(
        image_ids=[items.image_ids[i] for i in keep],
        image_paths=[items.image_paths[i] for i in keep],
        image_study=np.array([remap[int(items.image_study[i])] for i in keep]),
        image_patient=items.image_patient[keep],
        image_labels=items.image_labels[keep],
        study_ids=[items.study_ids[s] for s in used],
        reports=[items.reports[s] for s in used],
        study_labels=items.study_labels[used],
        label_names=items.label_names,
        skipped=items.skipped,
    )


def decode_images(items: SplitItems, size: int, show_progress: bool, desc: str) -> tuple[SplitItems, list]:
    """Decode every image once into RAM (uint8); unreadable images are skipped and reported in `skipped`."""
    decoded, bad = [], set()
    with make_progress(disable=not show_progress, transient=True) as progress:
        task = progress.add_task(desc, total=len(items.image_paths), unit="images")
        for i, path in enumerate(items.image_paths):
            try:
                decoded.append(_decode_small(path, size))
            except ImageReadError as e:
                bad.add(i)
                items.skipped.append(f"{items.image_ids[i]}: {e.reason}")
            progress.advance(task)
    return drop_unreadable(items, bad), decoded


# ------------------------------------------------------------------------------------------ features


@dataclass
class _Split:
    items: SplitItems
    labels: torch.Tensor  # (S, L) bool, per study
    study_images: list[list[int]]
    decoded: list[np.ndarray] | None = None
    image_feats: torch.Tensor | None = None  # (I, D) when the image tower is frozen and cached
    text_feats: torch.Tensor | None = None  # (S, D) when the text tower is frozen and cached


def cached_features(path: Path, key: dict[str, str], compute: Callable[[], torch.Tensor]) -> tuple[torch.Tensor, bool]:
    """Load features from `path` when its metadata matches `key`, else compute and store them atomically.
    Returns (features, hit)."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    if path.is_file():
        try:
            with safe_open(str(path), framework="pt") as f:
                if f.metadata() == key:
                    return f.get_tensor("features"), True
        except Exception:  # a corrupt cache file is recomputed, never trusted
            pass
    feats = compute().contiguous()
    with atomic_path(path) as tmp:
        save_file({"features": feats}, str(tmp), metadata=key)
    return feats, False


def _pooled_and_tokens(model: nn.Module, pixels: torch.Tensor) -> torch.Tensor:
    """(B, 1 + N, D): a CNN tower's pooled feature (the mean of its last feature map), then that map's N tokens."""
    tokens = model.image_tokens(pixels).float()
    return torch.cat([tokens.mean(dim=1, keepdim=True), tokens], dim=1)


def _keep_first_studies(split: _Split, n: int) -> None:
    """Cut a prepared split to its first `n` studies (images, decoded pixels and cached features alike)."""
    items = split.items
    keep = [i for i in range(len(items.image_ids)) if items.image_study[i] < n]
    split.items = drop_unreadable(items, set(range(len(items.image_ids))) - set(keep))
    if split.decoded is not None:
        split.decoded = [split.decoded[i] for i in keep]
    if split.image_feats is not None:
        split.image_feats = split.image_feats[keep]
    if split.text_feats is not None:
        split.text_feats = split.text_feats[:n]


# ------------------------------------------------------------------------------------------ the trainer


class Trainer:
    """One training run; see the module docstring. Use `train(...)` unless you need the pieces."""

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
        self.cache_hits: dict[str, bool] = {}

    # -------------------------------------------------------------- setup

    def _load_model(self) -> nn.Module:
        """The model with towers built under `tower_seed` and, for a fresh model, projector heads initialised
        under `seed` (a saved folder keeps its trained heads)."""
        from retrieval.models import ProjectorHeads, load_model

        saved = Path(str(self.model_name)).is_dir()
        key = (self.model_name, self.config.tower_seed, str(self.device))
        if not saved and key in _PRISTINE:
            model = copy.deepcopy(_PRISTINE[key])
        else:
            torch.manual_seed(self.config.tower_seed)
            model = load_model(self.model_name, device=self.device)
            if not saved:
                _PRISTINE.clear()  # keep one pristine copy per process
                _PRISTINE[key] = copy.deepcopy(model)
        if not saved:
            torch.manual_seed(self.config.seed)
            model.projector = ProjectorHeads(model.projector.cfg).to(self.device)
        return model

    def _scratch_towers(self) -> list[str]:
        if self.config.image_tower != "auto":
            return ["image"] if self.config.image_tower == "train" else []
        return ["image"] if getattr(self.model, "trains_image_tower", False) else []

    def _prepare_split(self, split: str, max_studies: int | None) -> _Split | None:
        cfg = self.config
        try:
            items = split_items(self.df, split)
        except ManifestError:
            if split == cfg.train_split:
                raise
            return None
        towers = tower_modules(self.model)
        t0 = time.perf_counter()
        text_cache = cfg.feature_cache and tower_frozen(towers["text"])
        decoded = None
        split_obj = _Split(items=items, labels=torch.zeros(0), study_images=[])
        if cfg.feature_cache and self.image_cut is not None:
            kind, forward = self.image_cut
            key = {
                "kind": kind,
                "tower": self.tower_hash["image_front"],
                "items": _items_hash(items, "image"),
                "image_size": str(getattr(self.model, "image_size", "")),
            }
            path = self.cache_dir / f"{kind}-{split}-{key['tower'][:12]}-{key['items'][:12]}.safetensors"
            holder: dict[str, Any] = {}

            keep_tokens = kind == "image" and cfg.token_cache is not None and getattr(self.model, "cnn_tower", False)

            def compute() -> torch.Tensor:
                from retrieval.models.image_stream import encode_image_items

                feats, kept, bad = encode_image_items(
                    self.model,
                    items.image_paths,
                    output=_pooled_and_tokens if keep_tokens else forward,
                    batch_size=max(cfg.batch_size, 64),
                    num_workers=cfg.num_workers,
                    precision=self.precision,
                    on_error="skip",
                    progress=f"image {kind} ({split})" if cfg.show_progress else None,
                )
                items.skipped.extend(f"{items.image_ids[i]}: {reason}" for i, reason in bad)
                holder["items"] = drop_unreadable(items, {i for i, _ in bad})
                if keep_tokens:  # the feature map's mean is the pooled feature; its grid is what the VLM reads
                    feats = self._keep_tokens([items.image_paths[i] for i in kept.tolist()], feats)
                return feats.to(torch.float16) if kind == "front" else feats

            feats, hit = cached_features(path, key, compute)
            self.cache_hits[f"image/{split}"] = hit
            split_obj.image_feats = feats
            if not hit:
                items = holder["items"]
            elif feats.shape[0] != len(items.image_ids):  # images that were unreadable when cached
                raise CXRError(f"{path}: cache does not match the split; delete it and retry")
        elif not tower_frozen(towers["image"]) or not cfg.feature_cache:
            items, decoded = decode_images(items, self._image_size(), cfg.show_progress, f"decode {split}")
        split_obj.items = items
        split_obj.decoded = decoded
        if text_cache:
            key = {"kind": "text", "tower": self.tower_hash["text"], "items": _items_hash(items, "text")}
            path = self.cache_dir / f"text-{split}-{key['tower'][:12]}-{key['items'][:12]}.safetensors"

            def compute_text() -> torch.Tensor:
                return self._report_features(items.reports, f"text features ({split})")

            split_obj.text_feats, self.cache_hits[f"text/{split}"] = cached_features(path, key, compute_text)
        if max_studies is not None and max_studies < len(split_obj.items.study_ids):
            _keep_first_studies(split_obj, max_studies)  # after the cache, so subsets share the split's cache
        items = split_obj.items
        split_obj.labels = torch.as_tensor(items.study_labels, dtype=torch.bool)
        study_images: list[list[int]] = [[] for _ in items.study_ids]
        for i, s in enumerate(items.image_study):
            study_images[int(s)].append(i)
        split_obj.study_images = study_images
        self.timings[f"prepare_{split}_s"] = round(time.perf_counter() - t0, 3)
        return split_obj

    def _keep_tokens(self, paths: list[str], pooled_and_tokens: torch.Tensor) -> torch.Tensor:
        """Add the grid tokens (rows 1: of each image's output) to the token cache; return the pooled features."""
        from retrieval.models.token_cache import TokenCache

        tokens = pooled_and_tokens[:, 1:]
        grid = self.config.token_grid
        if grid is None or tokens.shape[1] <= grid * grid:  # tokens the VLM would read as they are (no pooling)
            TokenCache(self.config.token_cache, self.tower_hash["image"], grid).add(paths, tokens)
        else:
            log.info("token cache: %d tokens per image exceed the %dx%d grid; not kept", tokens.shape[1], grid, grid)
        return pooled_and_tokens[:, 0].contiguous()

    def _report_features(self, reports: Sequence[str], desc: str) -> torch.Tensor:
        """Text-tower features of each report (once per distinct text, in batches of similar length)."""
        return text_features.pooled_features(
            lambda chunk: self.model.text_features(self.model.tokenize(chunk).to(self.device)),
            reports,
            max(self.config.batch_size, 64),
            show_progress=self.config.show_progress,
            desc=desc,
        )

    def _image_size(self) -> int:
        return int(getattr(self.model, "image_size", 224))

    def _pixels(self, source: _ImageSource, idx: Sequence[int]) -> torch.Tensor:
        return torch.stack([source[i] for i in idx]).to(self.device)

    # -------------------------------------------------------------- forward

    def _image_feats(self, split: _Split, idx: Sequence[int]) -> torch.Tensor:
        if split.image_feats is not None:
            feats = split.image_feats[list(idx)].to(self.device)
            return self.image_back(feats.float()) if self.image_back is not None else feats
        source = _ImageSource(split.items.image_paths, self.transform, split.decoded)
        return self.model.image_features(self._pixels(source, idx))

    def _text_feats(self, split: _Split, study_idx: Sequence[int]) -> torch.Tensor:
        if split.text_feats is not None:
            return split.text_feats[list(study_idx)].to(self.device)
        tokens = self.model.tokenize([split.items.reports[i] for i in study_idx])
        return self.model.text_features(tokens.to(self.device))

    def _embed(self, split: _Split, image_idx: Sequence[int], study_idx: Sequence[int]):
        img = self.model.project_images(self._image_feats(split, image_idx))
        txt = self.model.project_texts(self._text_feats(split, study_idx))
        return img, txt

    # -------------------------------------------------------------- epochs

    def _epoch_batches(self, epoch: int) -> list[tuple[list[int], list[int]]]:
        g = torch.Generator().manual_seed(self.config.seed * 100_003 + epoch)
        split = self.train_split
        order = torch.randperm(len(split.study_images), generator=g).tolist()
        picks = [
            imgs[int(torch.randint(len(imgs), (1,), generator=g))] if len(imgs) > 1 else imgs[0]
            for imgs in split.study_images
        ]
        bs = self.config.batch_size
        batches = []
        for start in range(0, len(order), bs):
            studies = order[start : start + bs]
            if len(studies) < 2:  # a contrastive batch needs at least two pairs
                continue
            batches.append(([picks[s] for s in studies], studies))
        return batches

    def _train_epoch(self, epoch: int) -> dict[str, float]:
        from retrieval.device import autocast

        _set_modes(self.model)
        self.loss.train()
        sums: dict[str, float] = {}
        batches = self._epoch_batches(epoch)
        with make_progress(disable=not self.config.show_progress, transient=True) as progress:
            task = progress.add_task(f"epoch {epoch + 1}/{self.config.epochs}", total=len(batches), unit="batches")
            for image_idx, study_idx in batches:
                with autocast(self.device, self.precision):
                    img, txt = self._embed(self.train_split, image_idx, study_idx)
                    logits = None
                    if self.loss.bce_weight > 0:
                        logits = torch.cat([self.model.abnormal_logit(img), self.model.abnormal_logit(txt)])
                out = self.loss(img, txt, self.train_split.labels[study_idx].to(self.device), logits)
                self.optimizer.zero_grad(set_to_none=True)
                out["loss"].backward()
                self.optimizer.step()
                self.loss.clamp_logit_scale_()
                for k, v in out.items():
                    sums[k] = sums.get(k, 0.0) + float(v.detach())
                progress.advance(task)
        n = max(1, len(batches))
        return {k: round(v / n, 5) for k, v in sums.items()}

    @torch.no_grad()
    def project_split(self, split: _Split) -> tuple[np.ndarray, np.ndarray]:
        """(image, report) embeddings of a prepared split with the current weights (eval mode)."""
        from retrieval.device import autocast

        self.model.eval()
        bs = max(self.config.batch_size, 64)
        imgs, txts = [], []
        n_img, n_txt = len(split.items.image_ids), len(split.items.reports)
        with autocast(self.device, self.precision):
            for start in range(0, n_img, bs):
                idx = list(range(start, min(n_img, start + bs)))
                imgs.append(self.model.project_images(self._image_feats(split, idx)).float().cpu())
            for start in range(0, n_txt, bs):
                idx = list(range(start, min(n_txt, start + bs)))
                txts.append(self.model.project_texts(self._text_feats(split, idx)).float().cpu())
        return torch.cat(imgs).numpy(), torch.cat(txts).numpy()

    def embed(self, split: str) -> tuple[SplitItems, np.ndarray, np.ndarray]:
        """Items and (image, report) embeddings of any manifest split, through the feature cache."""
        prepared = self._prepare_split(split, None)
        if prepared is None:
            raise CXRError(f"split {split!r} has no usable rows")
        img, txt = self.project_split(prepared)
        return prepared.items, img, txt

    def validate(self, split: _Split) -> dict[str, float]:
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

    # -------------------------------------------------------------- checkpoints

    @property
    def ckpt_dir(self) -> Path:
        return self.out / CHECKPOINT_DIR

    def _save_checkpoint(self, state: dict[str, Any], best: dict[str, torch.Tensor] | None) -> None:
        from safetensors.torch import save_file

        epoch = state["epoch"]
        self.ckpt_dir.mkdir(parents=True, exist_ok=True)
        weights = f"epoch{epoch:04d}.safetensors"
        optim = f"epoch{epoch:04d}.optim.pt"
        with atomic_path(self.ckpt_dir / weights) as tmp:
            save_file(trainable_state(self.model, self.loss), str(tmp))
        rng = {"torch": torch.get_rng_state()}
        if torch.cuda.is_available():
            rng["cuda"] = torch.stack(torch.cuda.get_rng_state_all())
        with atomic_path(self.ckpt_dir / optim) as tmp:
            torch.save({"optimizer": self.optimizer.state_dict(), "rng": rng}, tmp)
        if best is not None:
            with atomic_path(self.ckpt_dir / "best.safetensors") as tmp:
                save_file(best, str(tmp))
        state = {**state, "weights": weights, "optimizer": optim}
        write_json_atomic(self.ckpt_dir / "state.json", state)  # the commit point
        for old in self.ckpt_dir.glob("epoch*"):
            if old.name not in (weights, optim):
                old.unlink(missing_ok=True)

    def _load_checkpoint(self) -> dict[str, Any] | None:
        from safetensors.torch import load_file

        path = self.ckpt_dir / "state.json"
        if not path.is_file():
            return None
        try:
            state = json.loads(path.read_text())
            weights = load_file(str(self.ckpt_dir / state["weights"]))
            extra = torch.load(self.ckpt_dir / state["optimizer"], weights_only=True, map_location="cpu")
        except Exception as e:
            raise CXRError(
                f"{self.ckpt_dir}: cannot resume from the checkpoint ({type(e).__name__}: {e}); "
                "delete the folder or pass fresh=True / --fresh"
            ) from None
        if state.get("key") != self.key:
            raise CXRError(
                f"{self.out}: holds a checkpoint of a different run (model, data or settings differ); "
                "use another --out or --fresh to start over"
            )
        load_trainable_state(self.model, self.loss, weights)
        self.optimizer.load_state_dict(extra["optimizer"])
        torch.set_rng_state(extra["rng"]["torch"])
        if "cuda" in extra["rng"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(list(extra["rng"]["cuda"]))
        return state

    # -------------------------------------------------------------- run

    def setup(self) -> nn.Module:
        """Load the model (seeded), freeze/unfreeze its towers, hash the frozen ones for the feature cache.
        After this, `embed(split)` gives the untrained (zero-shot) model's embeddings."""
        cfg = self.config
        self.model = self._load_model()
        self.transform = self.model.image_transform()
        self.scratch = self._scratch_towers()
        self.tower_status = set_trainable(self.model, self.scratch, cfg.unfreeze_last)
        towers = tower_modules(self.model)
        self.tower_hash = {k: fingerprint_state(t.state_dict()) for k, t in towers.items() if tower_frozen(t)}
        self._plan_image_cache(towers["image"])
        self.cache_dir = Path(cfg.cache_dir) if cfg.cache_dir else self.out / CACHE_DIR
        clean_temporaries(self.out, self.ckpt_dir, self.cache_dir)  # what a killed run left behind
        return self.model

    def _plan_image_cache(self, tower: nn.Module) -> None:
        """What the image feature cache holds: the pooled features of a frozen tower ("image"), or for a CNN tower
        whose last stages train, the activations at the frozen boundary ("front"), so epochs run only the back."""
        from retrieval.models.tower_parts import split_cnn

        self.image_cut, self.image_back = None, None
        if tower_frozen(tower):
            self.image_cut = ("image", "features")
            self.tower_hash["image_front"] = self.tower_hash["image"]
            return
        parts = None if "image" in self.scratch else split_cnn(tower, self.config.unfreeze_last)
        if parts is not None:
            front, self.image_back = parts
            self.image_cut = ("front", lambda model, pixels: front(pixels))
            initial = fingerprint_state(tower.state_dict())  # the front never trains: its start state is its state
            self.tower_hash["image_front"] = f"{initial}-front{self.config.unfreeze_last}"

    def run(self, fresh: bool = False, on_epoch_end: Callable[[int, dict], None] | None = None) -> nn.Module:
        """Train (or resume) to the end, restore the best epoch's weights, save the model folder."""
        cfg = self.config
        t_start = time.perf_counter()
        self.setup()
        scratch = self.scratch
        if fresh and self.ckpt_dir.exists():
            shutil.rmtree(self.ckpt_dir)

        self.train_split = self._prepare_split(cfg.train_split, cfg.max_train_studies)
        self.val_split = self._prepare_split(cfg.val_split, None) if cfg.val_split else None
        if len(self.train_split.study_images) < 2:
            raise CXRError(f"split {cfg.train_split!r} has fewer than 2 usable studies")

        self.loss = CompositeLoss(
            *cfg.loss_weights, positive_rule=cfg.positive_rule, supcon_temperature=cfg.supcon_temperature
        ).to(self.device)
        self.optimizer = self._make_optimizer(scratch)
        self.key = self._run_key()

        state = self._load_checkpoint()
        if state is None:
            state = {
                "key": self.key,
                "epoch": 0,
                "best_epoch": None,
                "best_metric": None,
                "bad_epochs": 0,
                "history": [],
                "stopped_early": False,
            }
            best = None
        else:
            console.print(f"resuming {self.out} after epoch {state['epoch']}")
            best = self._load_best()

        epoch_times = []
        while state["epoch"] < cfg.epochs and not state["stopped_early"]:
            epoch = state["epoch"]
            t0 = time.perf_counter()
            losses = self._train_epoch(epoch)
            train_s = time.perf_counter() - t0
            epoch_times.append(train_s)
            val = self.validate(self.val_split) if self.val_split is not None else {}
            metric = val.get(cfg.monitor)
            improved = metric is not None and (state["best_metric"] is None or metric > state["best_metric"])
            if improved or self.val_split is None:
                state["best_metric"], state["best_epoch"], state["bad_epochs"] = metric, epoch + 1, 0
                best = trainable_state(self.model, self.loss)
            else:
                state["bad_epochs"] += 1
            state["epoch"] = epoch + 1
            state["history"].append({"epoch": epoch + 1, "train_s": round(train_s, 3), **losses, **val})
            if state["bad_epochs"] >= cfg.patience:
                state["stopped_early"] = True
            self._save_checkpoint(state, best if (improved or self.val_split is None) else None)
            line = ", ".join(f"{k} {v:.4f}" for k, v in {**losses, **val}.items())
            console.print(f"epoch {epoch + 1}/{cfg.epochs} ({train_s:.1f}s): {line}")
            if on_epoch_end is not None:
                on_epoch_end(epoch + 1, state)

        if best is not None:
            load_trainable_state(self.model, self.loss, best)
        self.state = state
        self.timings["epoch_s_mean"] = round(float(np.mean(epoch_times)), 3) if epoch_times else None
        self.timings["total_s"] = round(time.perf_counter() - t_start, 3)
        self._save_model()
        return self.model

    def _load_best(self) -> dict[str, torch.Tensor] | None:
        from safetensors.torch import load_file

        path = self.ckpt_dir / "best.safetensors"
        return load_file(str(path)) if path.is_file() else None

    def _make_optimizer(self, scratch: Sequence[str]) -> torch.optim.Optimizer:
        cfg = self.config
        tower_ids: dict[int, str] = {}
        for kind, tower in tower_modules(self.model).items():
            for p in tower.parameters():
                tower_ids[id(p)] = kind
        head, scratch_p, pre_p = [], [], []
        for p in self.model.parameters():
            if not p.requires_grad:
                continue
            kind = tower_ids.get(id(p))
            (head if kind is None else scratch_p if kind in scratch else pre_p).append(p)
        head += [p for p in self.loss.parameters() if p.requires_grad]
        groups = [{"params": head, "lr": cfg.lr}]
        if scratch_p:
            groups.append({"params": scratch_p, "lr": cfg.tower_lr or cfg.lr})
        if pre_p:
            groups.append({"params": pre_p, "lr": cfg.tower_lr or cfg.lr / 10})
        return torch.optim.AdamW(groups, weight_decay=cfg.weight_decay)

    def _run_key(self) -> str:
        h = hashlib.sha256()
        h.update(json.dumps(self.config.result_key(), sort_keys=True).encode())
        h.update(self.model_name.encode())
        h.update(_items_hash(self.train_split.items, "text").encode())
        h.update("\n".join(self.train_split.items.image_ids).encode())
        return h.hexdigest()

    def _save_model(self) -> None:
        self.model.save(self.out)
        self.model.source_dir = self.out  # the returned model now reads its folder's feature stores
        splits = [sp for sp in (self.train_split, self.val_split) if sp is not None and sp.text_feats is not None]
        if "text" in self.tower_hash and splits:  # frozen text tower: keep its features for `encode_texts`
            text_features.save_store(
                self.out,
                [t for sp in splits for t in sp.items.reports],
                torch.cat([sp.text_feats for sp in splits]),
                self.tower_hash["text"],
            )
        images = [sp for sp in (self.train_split, self.val_split) if sp is not None and sp.image_feats is not None]
        if self.image_cut is not None and self.image_cut[0] == "image" and images:  # frozen image tower: likewise
            from retrieval.models import feature_store

            feature_store.save_store(
                self.out / feature_store.IMAGE_STORE,
                feature_store.file_digests([p for sp in images for p in sp.items.image_paths]),
                torch.cat([sp.image_feats for sp in images]),
                self.tower_hash["image"],
                self.precision,
            )
        info = {
            "base_model": self.model_name,
            "manifest": self.manifest_label,
            "config": asdict(self.config),
            "towers": self.tower_status,
            "precision": self.precision,
            "device": str(self.device),
            "best_epoch": self.state["best_epoch"],
            "best_metric": self.state["best_metric"],
            "monitor": self.config.monitor,
            "stopped_early": self.state["stopped_early"],
            "epochs_run": self.state["epoch"],
            "history": self.state["history"],
            "train_studies": len(self.train_split.study_images),
            "train_images": len(self.train_split.items.image_ids),
            "val_images": 0 if self.val_split is None else len(self.val_split.items.image_ids),
            "skipped": self.train_split.items.skipped
            + ([] if self.val_split is None else self.val_split.items.skipped),
            "feature_cache_hits": self.cache_hits,
            "timings": self.timings,
            "fingerprint": str(getattr(self.model, "fingerprint", "")),
        }
        write_json_atomic(self.out / "train_info.json", info)
        from retrieval.models.bundle import write_checksums

        write_checksums(self.out)  # again, last: the feature stores and train_info.json are the folder's too
        self.info = info


def train(
    manifest: Any,
    model_name: str = "cxr-small",
    out_dir: str | Path = "runs/cxr",
    config: TrainConfig | None = None,
    fresh: bool = False,
    on_epoch_end: Callable[[int, dict], None] | None = None,
    **overrides: Any,
) -> nn.Module:
    """Train `model_name` on the manifest's train split and save it to `out_dir` (a normal model folder that
    `load_model(out_dir)` reloads, plus `train_info.json`, `checkpoint/` and `feature_cache/`).

    Resumes from `out_dir/checkpoint` when it holds an unfinished run with the same settings (`fresh=True`
    starts over). `overrides` set TrainConfig fields, e.g. `train(m, "cxr-tiny", "out", epochs=3)`."""
    config = TrainConfig(**{**asdict(config or TrainConfig()), **overrides})
    if isinstance(config.loss_weights, list):
        config.loss_weights = tuple(config.loss_weights)
    trainer = Trainer(manifest, model_name, out_dir, config)
    model = trainer.run(fresh=fresh, on_epoch_end=on_epoch_end)
    model.train_info = trainer.info  # type: ignore[attr-defined]
    return model
