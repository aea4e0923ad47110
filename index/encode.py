"""Stream-encoding images with DataLoader worker processes, skipping the ones that cannot be read.

Reader -> mapper -> writer, as in clip-retrieval: workers decode (`read_image`) and preprocess
(`model.image_transform()`), the main process embeds each batch (`model.image_features` +
`model.project_images`, bf16 autocast on a GPU) and hands (row ids, vectors, bad rows) to the
caller, which writes them out. A bad image is reported as (row id, reason) and never stops the stream.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import numpy as np
import torch

BadRows = list[tuple[int, str]]


class ImageRows(torch.utils.data.Dataset):
    """Item i = (i, preprocessed tensor or None, reason or None); read errors are caught, not raised."""

    def __init__(self, paths: Sequence[str], transform: Any):
        self.paths = list(paths)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[int, Any, str | None]:
        from retrieval.data.image_io import read_image
        from retrieval.errors import ImageReadError

        if not self.paths[i]:
            return i, None, "image_path is empty (this row has no image file)"
        try:
            return i, self.transform(read_image(self.paths[i])), None
        except ImageReadError as e:
            return i, None, e.reason
        except Exception as e:  # a transform failing on an odd image must not stop the build either
            return i, None, f"{type(e).__name__}: {e}"


def collate_rows(items: list[tuple[int, Any, str | None]]) -> tuple[list[int], torch.Tensor | None, BadRows]:
    """Split a batch into good rows (ids + stacked pixels) and bad rows (id, reason)."""
    good = [(i, x) for i, x, err in items if err is None]
    bad = [(i, err) for i, _, err in items if err is not None]
    pixels = torch.stack([torch.as_tensor(x) for _, x in good]) if good else None
    return [i for i, _ in good], pixels, bad


def model_device(model: Any) -> torch.device:
    """The device the model's weights are on (CPU for a model without parameters)."""
    dev = getattr(model, "device", None)
    if isinstance(dev, torch.device):
        return dev
    try:
        return next(model.parameters()).device
    except (AttributeError, StopIteration):
        return torch.device("cpu")


def default_precision(device: torch.device) -> str:
    """bf16 autocast on CUDA (fast, accurate enough for retrieval), fp32 on the CPU."""
    return "bf16" if device.type == "cuda" else "fp32"


@torch.no_grad()
def embed_pixels(model: Any, pixels: torch.Tensor, precision: str | None = None) -> np.ndarray:
    """Preprocessed pixels (B, 3, S, S) -> float32 L2-normalised (B, D) vectors: image tower + projector."""
    from retrieval.device import autocast

    device = model_device(model)
    precision = precision or default_precision(device)
    with autocast(device, precision):
        emb = model.project_images(model.image_features(pixels.to(device, non_blocking=True)))
    emb = torch.nn.functional.normalize(emb.float(), dim=-1)
    return np.ascontiguousarray(emb.cpu().numpy(), dtype=np.float32)


def stream_image_vectors(
    paths: Sequence[str],
    model: Any,
    batches: Iterable[list[int]],
    workers: int = 2,
    precision: str | None = None,
) -> Iterator[tuple[np.ndarray, np.ndarray, BadRows]]:
    """Yield (row ids, vectors, bad rows) per batch of row indices into `paths`, in the order of `batches`."""
    loader = torch.utils.data.DataLoader(
        ImageRows(paths, model.image_transform()),
        batch_sampler=list(batches),
        num_workers=workers,
        collate_fn=collate_rows,
        pin_memory=model_device(model).type == "cuda",
        prefetch_factor=4 if workers > 0 else None,
    )
    for ids, pixels, bad in loader:
        if pixels is None:
            vecs = np.zeros((0, int(model.embed_dim)), dtype=np.float32)
        else:
            vecs = embed_pixels(model, pixels, precision)
        yield np.asarray(ids, dtype=np.int64), vecs, bad
