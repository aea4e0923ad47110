"""Image towers by name: any timm model (`timm:NAME`) or transformers vision model (`hf:ORG/NAME`), from the hub or
from a local folder, each at its native input size and normalisation.

- `timm:NAME` (a timm registry name, pretrained weights from the hub), `timm:hf-hub:ORG/REPO`, or `timm:/a/folder`
  (timm's own `save_for_hf` layout: `config.json` with the architecture, `model_args` and `pretrained_cfg`, plus
  the weights). Size, mean, std and interpolation: `timm.data.resolve_data_config` of the model.
- `hf:ORG/NAME` or `hf:/a/folder`: a transformers vision model (DINOv2 / RAD-DINO, SigLIP / MedSigLIP, ...); a
  two-tower checkpoint (SigLIP, CLIP) gives its vision half. Size, mean and std: its image processor
  (`preprocessor_config.json`); a model without one is refused, never guessed.

The tower is wrapped so that the rest of the project sees what it sees of open_clip's towers: `forward(pixels)` ->
pooled `(B, D)`, `tokens(pixels)` -> patch tokens `(B, N, D)` for the VLM, `image_size`, `output_dim`, and
`native_preprocess` (mean, std, interpolation). A saved model keeps the tower's architecture config (never its
weights: those are in the model's safetensors) in the folder's `vision/`, so it rebuilds offline (`save_config`,
`build_tower(..., local=FOLDER/vision)`).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn

from retrieval.errors import ModelLoadError

log = logging.getLogger(__name__)

TIMM_PREFIX = "timm:"
HF_PREFIX = "hf:"
VISION_DIR = "vision"  # in a saved model folder: the named tower's architecture (and image processor) config
PIL_RESAMPLE = {0: "nearest", 2: "bilinear", 3: "bicubic", 4: "area", 1: "bilinear", 5: "bicubic"}


def is_tower_name(name: str) -> bool:
    """True for `timm:...` and `hf:...` (not `hf-hub:`, which names an open_clip model)."""
    return name.startswith((TIMM_PREFIX, HF_PREFIX)) and len(name.split(":", 1)[1]) > 0


def _square(size: Any) -> int:
    """An image size (int, (H, W), (C, H, W) or an HF size dict) -> one side; non-square -> the longest side."""
    if isinstance(size, (tuple, list)):
        return max(int(s) for s in size[-2:])
    if isinstance(size, (int, float)):
        return int(size)
    keys = ("height", "width", "shortest_edge", "longest_edge")  # an HF size: a dict or transformers' SizeDict
    get = size.get if isinstance(size, dict) else lambda k: getattr(size, k, None)
    return max(int(get(k)) for k in keys if get(k))


class TimmTower(nn.Module):
    """A timm model without its classifier: pooled features as timm pools them (a ViT's class token, a CNN's mean)."""

    def __init__(self, trunk: nn.Module, source: str):
        super().__init__()
        from timm.data import resolve_data_config

        self.trunk = trunk
        self.head = nn.Identity()  # tower_parts.split_cnn calls tower.head, as on open_clip's TimmModel
        self.source = source
        cfg = resolve_data_config({}, model=trunk)
        self.image_size = _square(cfg["input_size"])
        self.output_dim = int(trunk.num_features)
        interpolation = cfg.get("interpolation", "bicubic")
        self.native_preprocess = {
            "mean": [float(m) for m in cfg["mean"]],
            "std": [float(s) for s in cfg["std"]],
            "interpolation": interpolation if interpolation in ("bilinear", "bicubic", "nearest") else "bicubic",
        }

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.trunk(pixels)

    def tokens(self, pixels: torch.Tensor) -> torch.Tensor:
        """(B, N, D) patch tokens after the final norm (class and register tokens dropped), or a CNN's grid."""
        feats = self.trunk.forward_features(pixels)
        if feats.ndim == 4:
            return feats.flatten(2).transpose(1, 2)
        return feats[:, int(getattr(self.trunk, "num_prefix_tokens", 0)) :]

    def save_config(self, folder: Path) -> None:
        from timm.models._hub import save_config_for_hf

        folder.mkdir(parents=True, exist_ok=True)
        save_config_for_hf(self.trunk, str(folder / "config.json"))


class HFTower(nn.Module):
    """A transformers vision model: its pooler output (DINOv2's normed class token, SigLIP's attention pool), else
    the mean of its last hidden states."""

    def __init__(self, model: nn.Module, processor: Any, source: str):
        super().__init__()
        self.model = model
        self.source = source
        self.processor = processor
        crop = getattr(processor, "crop_size", None) if getattr(processor, "do_center_crop", False) else None
        self.image_size = _square(crop or processor.size)
        cfg = model.config
        self.output_dim = int(getattr(cfg, "hidden_size", 0))
        self.patch_size = int(getattr(cfg, "patch_size", 0) or 0)
        resample = PIL_RESAMPLE.get(int(getattr(processor, "resample", 3) or 3), "bicubic")
        self.native_preprocess = {
            "mean": [float(m) for m in processor.image_mean],
            "std": [float(s) for s in processor.image_std],
            "interpolation": resample if resample != "area" else "bilinear",
        }

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        out = self.model(pixel_values=pixels)
        pooled = getattr(out, "pooler_output", None)
        return pooled if pooled is not None else out.last_hidden_state.mean(dim=1)

    def tokens(self, pixels: torch.Tensor) -> torch.Tensor:
        """(B, N, D) patch tokens of the last layer (class and register tokens, which come first, dropped)."""
        hidden = self.model(pixel_values=pixels).last_hidden_state
        if self.patch_size:
            n = (pixels.shape[-2] // self.patch_size) * (pixels.shape[-1] // self.patch_size)
            return hidden[:, hidden.shape[1] - n :]
        return hidden

    def save_config(self, folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        self.model.config.save_pretrained(folder)
        self.processor.save_pretrained(folder)


def _timm_tower(ref: str, local: Path | None) -> TimmTower:
    import timm

    if local is not None:  # a saved model: the architecture from vision/config.json, weights loaded by the caller
        name, pretrained = f"local-dir:{local}", False
    elif Path(ref).expanduser().is_dir():
        name, pretrained = f"local-dir:{Path(ref).expanduser().resolve()}", True
    else:
        name, pretrained = ref, True
    try:
        trunk = timm.create_model(name, pretrained=pretrained, num_classes=0)
    except Exception as e:  # noqa: BLE001 - unknown names, missing files, hub errors: one line naming the tower
        msg = f"{type(e).__name__}: {e}".splitlines()[0][:300]
        raise ModelLoadError(f"timm:{ref}: cannot build the tower ({msg})") from None
    return TimmTower(trunk, f"{TIMM_PREFIX}{ref}")


def _vision_config(config: Any) -> Any:
    """The vision half of a two-tower config (SigLIP, CLIP), else the config itself."""
    return getattr(config, "vision_config", None) or config


def _hf_tower(ref: str, local: Path | None, cache_dir: str | None) -> HFTower:
    from transformers import AutoConfig, AutoImageProcessor, AutoModel
    from transformers.models.auto.modeling_auto import MODEL_MAPPING

    where = str(local) if local is not None else ref
    try:
        processor = AutoImageProcessor.from_pretrained(where, cache_dir=cache_dir)
    except Exception as e:  # noqa: BLE001
        msg = f"{type(e).__name__}: {e}".splitlines()[0][:300]
        what = (
            "no image processor (preprocessor_config.json) in the folder"
            if Path(where).is_dir()
            else "cannot fetch its image processor from the hub or the HF cache (offline? `cxr models prefetch`)"
        )
        raise ModelLoadError(f"hf:{ref}: {what}, so no native size and normalisation ({msg})") from None
    try:
        config = _vision_config(AutoConfig.from_pretrained(where, cache_dir=cache_dir))
        if local is not None:
            model = AutoModel.from_config(config)
        else:
            model = MODEL_MAPPING[type(config)].from_pretrained(where, config=config, cache_dir=cache_dir)
    except Exception as e:  # noqa: BLE001
        msg = f"{type(e).__name__}: {e}".splitlines()[0][:300]
        raise ModelLoadError(f"hf:{ref}: cannot build the vision model ({msg})") from None
    return HFTower(model, processor, f"{HF_PREFIX}{ref}")


def build_tower(name: str, local: Path | None = None, cache_dir: str | None = None) -> TimmTower | HFTower:
    """The image tower `name` names (`timm:...` / `hf:...`), with pretrained weights; with `local` (a saved model's
    `vision/` folder) only its architecture, for the saved weights to fill. Raises ModelLoadError."""
    if not is_tower_name(name):
        raise ModelLoadError(f"{name!r}: not a tower name (timm:NAME or hf:ORG/NAME)")
    kind, ref = name.split(":", 1)
    log.info("image tower %s (%s)", name, "architecture from " + str(local) if local else "pretrained")
    if kind + ":" == TIMM_PREFIX:
        return _timm_tower(ref, local)
    return _hf_tower(ref, local, cache_dir)


def tower_clip(visual: nn.Module, embed_dim: int, text_cfg: dict) -> nn.Module:
    """An open_clip CustomTextCLIP around a named image tower and an open_clip text tower from `text_cfg`."""
    import numpy as np
    from open_clip.model import CustomTextCLIP, _build_text_tower

    class TowerCLIP(CustomTextCLIP):
        def __init__(self) -> None:
            nn.Module.__init__(self)
            self.output_dict = False
            self.visual = visual
            self.text = _build_text_tower(embed_dim, text_cfg)
            self.context_length = self.text.context_length
            self.vocab_size = self.text.vocab_size
            self.logit_scale = nn.Parameter(torch.ones([]) * np.log(1 / 0.07))
            self.logit_bias = None

    return TowerCLIP()
