"""A split as training reads it: its items, per-study labels and images, decoded pixels or cached features."""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from retrieval.data.split_items import SplitItems
from retrieval.errors import ImageReadError
from retrieval.progress import make_progress


@dataclass
class PreparedSplit:
    items: SplitItems
    labels: torch.Tensor  # (S, L) bool, per study
    study_images: list[list[int]]  # each study's image positions
    decoded: list[np.ndarray] | None = None  # uint8 pixels, when a tower trains on them
    image_feats: torch.Tensor | None = None  # (I, D) when the image tower (or its front) is frozen and cached
    text_feats: torch.Tensor | None = None  # (S, D) when the text tower is frozen and cached


def finish_split(split: PreparedSplit, max_studies: int | None) -> PreparedSplit:
    """Cut to the first `max_studies` studies (after the cache, so subsets share the split's cache); fill the
    per-study labels and image lists."""
    if max_studies is not None and max_studies < len(split.items.study_ids):
        keep_first_studies(split, max_studies)
    items = split.items
    split.labels = torch.as_tensor(items.study_labels, dtype=torch.bool)
    split.study_images = [[] for _ in items.study_ids]
    for i, s in enumerate(items.image_study):
        split.study_images[int(s)].append(i)
    return split


def items_hash(items: SplitItems, kind: str) -> str:
    """The cache key of a split's content: image ids, paths, sizes and mtimes ("image"), or the reports."""
    h = hashlib.sha256(kind.encode())
    if kind == "image":
        for image_id, path in zip(items.image_ids, items.image_paths, strict=True):
            st = Path(path).stat()
            h.update(f"{image_id}\0{path}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    else:
        for text in items.reports:
            h.update(text.encode() + b"\0")
    return h.hexdigest()


class ImageSource(torch.utils.data.Dataset):
    """Pixels of the split's images: read from disk (or the in-memory decoded copy) and transformed."""

    def __init__(
        self,
        paths: Sequence[str],
        transform: Callable,
        decoded: list[np.ndarray] | None = None,
        augment: Callable | None = None,
        rng: np.random.Generator | None = None,
    ):
        self.paths = list(paths)
        self.transform = transform
        self.decoded = decoded
        self.augment, self.rng = augment, rng  # augment(array, rng) before the transform (training batches)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> torch.Tensor:
        if self.decoded is not None:
            arr = self.decoded[i].astype(np.float32) / 255.0
        else:
            from retrieval.data.image_io import read_image

            arr = read_image(self.paths[i])
        if self.augment is not None:
            arr = self.augment(arr, self.rng)
        return self.transform(arr)


def decode_small(path: str, size: int) -> np.ndarray:
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
                decoded.append(decode_small(path, size))
            except ImageReadError as e:
                bad.add(i)
                items.skipped.append(f"{items.image_ids[i]}: {e.reason}")
            progress.advance(task)
    return drop_unreadable(items, bad), decoded


def keep_first_studies(split: PreparedSplit, n: int) -> None:
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


def epoch_batches(study_images: list[list[int]], seed: int, epoch: int, batch_size: int) -> list[tuple[list, list]]:
    """The epoch's (image positions, study positions) batches: studies shuffled by a generator seeded by (seed,
    epoch), one image drawn per study; a last batch of one study is dropped (a contrastive batch needs two)."""
    g = torch.Generator().manual_seed(seed * 100_003 + epoch)
    order = torch.randperm(len(study_images), generator=g).tolist()
    picks = [
        imgs[int(torch.randint(len(imgs), (1,), generator=g))] if len(imgs) > 1 else imgs[0] for imgs in study_images
    ]
    batches = []
    for start in range(0, len(order), batch_size):
        studies = order[start : start + batch_size]
        if len(studies) >= 2:
            batches.append(([picks[s] for s in studies], studies))
    return batches
