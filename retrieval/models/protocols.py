"""What `index/` and `generation/` need from a model, named as Protocols instead of `model: Any`.

`CXRModel` satisfies both; the VLM's `FrozenPatchEncoder` satisfies `VisualEncoder`. Any object with these members
works (a test double, another tower), so the index and the VLM do not depend on how a model is built.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch


@runtime_checkable
class ImageTowerModel(Protocol):
    """What the one image path (`image_stream.stream_images`) calls."""

    def image_transform(self) -> Callable[[np.ndarray], torch.Tensor]: ...

    def image_features(self, pixels: torch.Tensor) -> torch.Tensor: ...

    def project_images(self, feats: torch.Tensor) -> torch.Tensor: ...


@runtime_checkable
class EmbeddingModel(ImageTowerModel, Protocol):
    """A retrieval model as an index uses it: name, fingerprint, dimension and the encode API."""

    name: str

    @property
    def fingerprint(self) -> str: ...

    @property
    def embed_dim(self) -> int: ...

    def encode_images(self, images: Sequence[Any], batch_size: int = 32, **kwargs: Any) -> np.ndarray: ...

    def encode_texts(self, texts: Sequence[str], batch_size: int = 64, **kwargs: Any) -> np.ndarray: ...


@runtime_checkable
class VisualEncoder(Protocol):
    """A frozen visual encoder of the VLM: (B, C, S, S) pixels -> (B, N, D) tokens, and a folder to save into."""

    def image_transform(self) -> Callable[[np.ndarray], torch.Tensor]: ...

    def image_tokens(self, pixels: torch.Tensor) -> torch.Tensor: ...

    def save(self, out_dir: str | Path) -> Any: ...
