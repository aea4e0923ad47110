"""Retrieval models: configs by name, open_clip towers, projector heads, the encode API, save/load."""

from retrieval.models.encoder import CXRModel
from retrieval.models.loader import build_model, load_model
from retrieval.models.preprocess import GreyImageTransform
from retrieval.models.projector import ProjectorConfig, ProjectorHeads
from retrieval.models.registry import ModelSpec, list_models, resolve

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
