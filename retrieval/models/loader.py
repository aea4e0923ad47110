"""`load_model(name_or_path)`: resolve the name (registry), build towers + tokenizer (towers), attach projector heads,
load saved weights strictly and check the fingerprint (checkpoint)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from retrieval.device import resolve_device
from retrieval.errors import ModelLoadError
from retrieval.models.encoder import CXRModel
from retrieval.models.projector import ProjectorConfig, ProjectorHeads
from retrieval.models.registry import ModelSpec, resolve
from retrieval.models.saved_model import PROJECTOR_FILE, TOWERS_FILE, load_safetensors_strict
from retrieval.models.towers import build_from_config, build_tokenizer, create_open_clip


def _tower_dims(clip: torch.nn.Module) -> tuple[int, int]:
    """Output sizes of the image and text towers (open_clip's embed_dim for both, read from the modules)."""
    text_dim = int(getattr(clip.text, "output_dim", 0) or 0)
    image_dim = int(getattr(clip.visual, "output_dim", 0) or 0)
    if not image_dim or not text_dim:
        was_training = clip.training
        clip.eval()  # a probe in train mode would move BatchNorm running statistics (pretrained CNN towers)
        with torch.no_grad():
            size = clip.visual.image_size
            size = size if isinstance(size, (tuple, list)) else (size, size)
            image_dim = image_dim or int(clip.encode_image(torch.zeros(1, 3, *size)).shape[-1])
            text_dim = text_dim or int(clip.encode_text(torch.ones(1, 4, dtype=torch.long)).shape[-1])
        clip.train(was_training)
    return image_dim, text_dim


def _projector(spec: ModelSpec, clip: torch.nn.Module) -> ProjectorHeads:
    image_dim, text_dim = _tower_dims(clip)
    settings = {"image_dim": image_dim, "text_dim": text_dim, **spec.projector}
    settings.setdefault("embed_dim", int(spec.model_cfg.get("embed_dim", 512)) if spec.model_cfg else 512)
    try:
        cfg = ProjectorConfig.from_dict(settings)
    except (TypeError, ValueError) as e:
        raise ModelLoadError(f"{spec.name}: bad projector config ({e})") from None
    if (cfg.image_dim, cfg.text_dim) != (image_dim, text_dim):
        raise ModelLoadError(
            f"{spec.name}: projector expects tower outputs ({cfg.image_dim}, {cfg.text_dim}) "
            f"but the towers give ({image_dim}, {text_dim})"
        )
    return ProjectorHeads(cfg)


@contextmanager
def _quiet_transformers() -> Iterator[None]:
    """Silence transformers' load reports and progress bars while towers are built (restored afterwards)."""
    from transformers.utils import logging as hf_logging

    level, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)
        if bars:
            hf_logging.enable_progress_bar()


def build_model(spec: ModelSpec, cache_dir: str | None = None, seed: int = 0) -> CXRModel:
    """Build (and for saved folders, load) the model a spec describes, on the CPU.

    Randomly initialised parts (cxr-tiny's image tower, fresh projector heads) come from `seed`, so loading the
    same name twice gives the same weights and fingerprint; the global torch RNG is left untouched."""
    with _quiet_transformers(), torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return _build_model(spec, cache_dir)


def _build_model(spec: ModelSpec, cache_dir: str | None) -> CXRModel:
    if spec.kind in ("hf-hub", "local-dir"):
        clip, model_cfg = create_open_clip(spec, cache_dir=cache_dir)
    else:
        model_cfg = spec.model_cfg
        clip = build_from_config(
            model_cfg,
            spec.preprocess_cfg,
            text_source=spec.text_local,
            text_pretrained=spec.text_pretrained,
            text_hf_config=spec.text_hf_config,
            image_weights=spec.image_weights,
            vision_local=spec.vision_local,
        )
    tokenizer = build_tokenizer(spec, model_cfg, cache_dir=cache_dir)
    model = CXRModel(
        clip,
        tokenizer,
        _projector(spec, clip),
        name=spec.name,
        model_cfg=model_cfg,
        trains_image_tower=spec.trains_image_tower,
        description=spec.description,
    )
    if spec.kind == "saved":
        _load_saved_weights(model, spec.path)
        model.source_dir = Path(spec.path)
    return model


def _load_saved_weights(model: CXRModel, folder: Path) -> None:
    import json

    load_safetensors_strict(model.clip, folder / TOWERS_FILE)
    load_safetensors_strict(model.projector, folder / PROJECTOR_FILE)
    info = json.loads((folder / "model_info.json").read_text(encoding="utf-8"))
    want = info.get("fingerprint")
    if want and want != model.fingerprint:
        raise ModelLoadError(
            f"{folder / 'model_info.json'}: the weights' fingerprint {model.fingerprint[:12]}… differs from the "
            f"recorded {str(want)[:12]}… (weights changed or corrupted after saving)"
        )


def load_model(
    name_or_path: str | Path,
    device: str | torch.device | None = None,
    cache_dir: str | None = None,
    seed: int = 0,
) -> CXRModel:
    """A CXRModel in eval mode on `device` (None: CUDA if present, else CPU).

    `cxr-tiny`, `biomedclip`, `biomedclip-arch` (see `list_models()`), `hf-hub:ORG/REPO`, `local-dir:PATH` or a
    folder written by `CXRModel.save`. Fresh models have untrained projector heads, initialised from `seed`
    (deterministic). Its towers come frozen (`requires_grad=False`); the projector heads do not. `cache_dir`: the
    HF hub cache for hub models. Raises ModelLoadError."""
    spec = resolve(name_or_path)
    model = build_model(spec, cache_dir=cache_dir, seed=seed)
    model.freeze_towers()  # inference by default; training unfreezes what it trains (train.set_trainable)
    model.to(resolve_device(device))
    return model.eval()
