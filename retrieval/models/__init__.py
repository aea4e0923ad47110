"""Retrieval models: configs by name, open_clip towers, projector heads, the encode API, save/load."""

import importlib
from typing import Any

# Imported on first use (PEP 562): `retrieval.models.onnx_embedder` and the registry must not pull in torch and
# open_clip (seconds) for a process that never builds a model (`cxr query IMAGE` through ONNX Runtime).
_HOMES = {
    "CXRModel": "encoder",
    "build_model": "loader",
    "load_model": "loader",
    "GreyImageTransform": "preprocess",
    "ProjectorConfig": "projector",
    "ProjectorHeads": "projector",
    "ModelSpec": "registry",
    "list_models": "registry",
    "resolve": "registry",
}


def __getattr__(name: str) -> Any:
    if name not in _HOMES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"retrieval.models.{_HOMES[name]}"), name)
    globals()[name] = value
    return value


__all__ = [
    "CXRModel",
    "GreyImageTransform",
    "ModelSpec",
    "ProjectorConfig",
    "ProjectorHeads",
    "build_model",
    "list_models",
    "load_model",
    "resolve",
]
