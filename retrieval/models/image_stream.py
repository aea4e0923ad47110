"""The one image-embedding path: items -> pixels (decoded and preprocessed in DataLoader workers) -> one forward
pass per batch, with one precision policy and one bad-item rule.

Every caller that turns images into numbers goes through `stream_images` (or `encode_image_items`, which collects
its batches): `CXRModel.encode_images`, index build and add, `cxr query` (one image or a folder), the trainer's
frozen-feature pass, and the VLM's visual tokens. Reader -> mapper -> writer, as in clip-retrieval: workers read
(`read_image`) and transform (`model.image_transform()`), the main process runs the model, the caller writes.

- `output`: "embeddings" (projected, L2-normalised float32 numpy), "features" (the image tower's pooled output,
  float32 tensor), "tokens" (`image_tokens`: the patch/grid tokens the VLM reads), or a callable
  `fn(model, pixels) -> Tensor` for a trainer's own cut through the tower.
- `precision`: "auto" = bf16 autocast on CUDA, fp32 elsewhere (`retrieval.device.resolve_precision`), for every
  caller alike.
- `on_error`: "raise" raises `ImageReadError` naming the first unreadable item; "skip" reports (position, reason)
  in each batch's `bad` and goes on, so one bad file never stops a batch job.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from retrieval.device import autocast, resolve_precision
from retrieval.errors import ImageReadError

OUTPUTS = ("embeddings", "features", "tokens")
ON_ERROR = ("raise", "skip")
BadItems = list[tuple[int, str]]


@dataclass
class ImageBatch:
    """One batch out of the stream: positions of the good items, their outputs (in that order), the bad items."""

    positions: np.ndarray  # int64 positions into the input items
    values: Any  # np.ndarray for "embeddings", torch.Tensor otherwise
    bad: BadItems  # (position, reason)


def _describe(item: Any, i: int) -> str:
    return str(item) if isinstance(item, (str, Path)) else f"images[{i}]"


class ImageItems(torch.utils.data.Dataset):
    """Item i -> (i, (3, S, S) tensor or None, "where\\0reason" or None). Paths are read with `read_image`; HxW
    arrays and preprocessed (3, S, S) tensors are accepted too. Errors travel back as strings, because an
    exception raised inside a DataLoader worker would lose its type."""

    def __init__(self, items: Sequence[Any], transform: Callable[[np.ndarray], torch.Tensor]):
        self.items = items
        self.transform = transform

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> tuple[int, torch.Tensor | None, str | None]:
        item = self.items[i]
        try:
            if isinstance(item, str) and not item:
                raise ImageReadError(f"images[{i}]", "image_path is empty (this row has no image file)")
            if isinstance(item, torch.Tensor) and item.ndim == 3:
                size = int(getattr(self.transform, "size", item.shape[-1]))
                if tuple(item.shape) != (3, size, size):
                    raise ValueError(f"a preprocessed image must be (3, {size}, {size}), got {tuple(item.shape)}")
                return i, item.float(), None
            if isinstance(item, torch.Tensor):
                item = item.detach().cpu().float().numpy()
            if isinstance(item, (str, Path)):
                from retrieval.data.image_io import read_image

                item = read_image(item, min_size=getattr(self.transform, "size", None))
            return i, torch.as_tensor(self.transform(item)), None
        except ImageReadError as e:
            return i, None, f"{e.path}\0{e.reason}"
        except Exception as e:  # a transform failing on an odd image must not stop a batch job either
            return i, None, f"{_describe(item, i)}\0{type(e).__name__}: {e}"


def _collate(batch: list) -> list:
    return batch


def model_device(model: Any) -> torch.device:
    """The device the model's weights are on (CPU for a model without parameters)."""
    dev = getattr(model, "device", None)
    if isinstance(dev, torch.device):
        return dev
    try:
        return next(model.parameters()).device
    except (AttributeError, StopIteration, TypeError):
        return torch.device("cpu")


def _forward(model: Any, output: str | Callable, pixels: torch.Tensor | None, feats: torch.Tensor | None):
    """The requested output, from pixels, or from stored pooled features (`feats`) where the tower can be skipped."""
    if callable(output):
        return output(model, pixels)
    if feats is None and output != "tokens":
        feats = model.image_features(pixels)
    if output == "embeddings":
        return model.project_images(feats)
    if output == "features":
        return feats
    return model.image_tokens(pixels)


@torch.no_grad()
def _run(model: Any, output: str | Callable, precision: str, pixels=None, feats=None):
    device = model_device(model)
    pixels = None if pixels is None else pixels.to(device, non_blocking=True)
    feats = None if feats is None else feats.to(device)
    with autocast(device, resolve_precision(precision, device)):
        out = _forward(model, output, pixels, feats)
    if output == "embeddings":
        out = torch.nn.functional.normalize(out.float(), dim=-1)
        return np.ascontiguousarray(out.cpu().numpy(), dtype=np.float32)
    return out.float().cpu()


def run_pixels(model: Any, pixels: torch.Tensor, output: str | Callable = "embeddings", precision: str = "auto"):
    """One forward pass on preprocessed (B, C, S, S) pixels -> the outputs `stream_images` yields for them."""
    return _run(model, output, precision, pixels=pixels)


def stream_images(
    model: Any,
    items: Sequence[Any],
    *,
    output: str | Callable = "embeddings",
    batch_size: int = 32,
    batches: Iterable[Sequence[int]] | None = None,
    num_workers: int = 0,
    precision: str = "auto",
    on_error: str = "raise",
    progress: str | None = None,
) -> Iterator[ImageBatch]:
    """Yield one ImageBatch per batch of `items` (paths, HxW arrays or (3, S, S) tensors), in order.

    `batches`: lists of positions to group (default: consecutive runs of `batch_size`); `num_workers > 0` decodes
    and preprocesses in worker processes; `progress`: a description to show a progress bar on stderr."""
    if not callable(output) and output not in OUTPUTS:
        raise ValueError(f"output must be one of {OUTPUTS} or a callable, got {output!r}")
    if on_error not in ON_ERROR:
        raise ValueError(f"on_error must be one of {ON_ERROR}, got {on_error!r}")
    from retrieval.progress import make_progress

    items = list(items)
    if batches is None:
        step = max(1, int(batch_size))
        batches = [list(range(s, min(len(items), s + step))) for s in range(0, len(items), step)]
    batches = [list(b) for b in batches]
    if not items or not batches:
        return
    known = {}
    if output in ("embeddings", "features") and hasattr(model, "stored_image_features"):
        device = model_device(model)
        known = model.stored_image_features(items, resolve_precision(precision, device))
    todo = [[i for i in b if i not in known] for b in batches]
    workers = max(0, int(num_workers))
    loader = torch.utils.data.DataLoader(
        ImageItems(items, model.image_transform()),
        batch_sampler=[b for b in todo if b],
        num_workers=workers,
        collate_fn=_collate,
        pin_memory=model_device(model).type == "cuda",
        prefetch_factor=4 if workers > 0 else None,
    )
    # Only the modules in training mode are switched (to eval) and back: a served model is already in eval, and
    # `model.eval()` walking and re-setting its ~400 modules cost a few ms per interactive query.
    training = [m for m in model.modules() if m.training] if isinstance(model, torch.nn.Module) else []
    for module in training:
        module.training = False
    try:
        with make_progress(disable=progress is None) as bar:
            task = bar.add_task(progress or "", total=sum(map(len, batches)), unit="images")
            decoded = iter(loader)
            for batch, pending in zip(batches, todo, strict=True):
                loaded = next(decoded) if pending else []
                bad = [(i, err) for i, _, err in loaded if err is not None]
                if bad and on_error == "raise":
                    where, reason = bad[0][1].split("\0", 1)
                    raise ImageReadError(where, reason)
                good = [(i, t) for i, t, err in loaded if err is None]
                parts, positions = [], []
                if good:
                    parts.append(run_pixels(model, torch.stack([t for _, t in good]), output, precision))
                    positions += [i for i, _ in good]
                stored = [i for i in batch if i in known]
                if stored:
                    parts.append(_run(model, output, precision, feats=torch.stack([known[i] for i in stored])))
                    positions += stored
                values = _join(parts) if parts else _empty(model, output)
                reasons = [(i, e.split("\0", 1)[1]) for i, e in bad]
                yield ImageBatch(np.asarray(positions, dtype=np.int64), values, reasons)
                bar.advance(task, len(batch))
    finally:
        for module in training:  # each module back in its own mode (a trainer's frozen parts stay in eval)
            module.training = True


def _join(parts: list) -> Any:
    if isinstance(parts[0], np.ndarray):
        return np.ascontiguousarray(np.concatenate(parts), dtype=np.float32)
    return torch.cat(parts)


def _empty(model: Any, output: str | Callable) -> Any:
    if output == "embeddings":
        return np.zeros((0, int(model.embed_dim)), dtype=np.float32)
    return torch.zeros(0)


def encode_image_items(
    model: Any, items: Sequence[Any], **kwargs: Any
) -> tuple[Any, np.ndarray, BadItems]:
    """`stream_images` collected: (outputs of the good items stacked in input order, their positions, bad items)."""
    parts, positions, bad = [], [], []
    for b in stream_images(model, items, **kwargs):
        if len(b.positions):
            parts.append(b.values)
            positions.append(b.positions)
        bad.extend(b.bad)
    pos = np.concatenate(positions) if positions else np.zeros(0, dtype=np.int64)
    if not parts:
        return _empty(model, kwargs.get("output", "embeddings")), pos, bad
    values = _join(parts)
    order = np.argsort(pos, kind="stable")  # stored items come after the decoded ones within a batch
    return values[order] if not isinstance(values, torch.Tensor) else values[torch.from_numpy(order)], pos[order], bad
