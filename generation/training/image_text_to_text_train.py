"""LoRA fine-tuning of a pretrained image-text-to-text VLM (`image_text_to_text.py`) on a study manifest.

The examples are the project's own (`tasks.build_examples`: report, vqa, classify, identify, ground, from the
training split); their boxes are re-written in the model's own format (`box_formats.py`: PaliGemma `<loc>`
tokens, Qwen2.5-VL JSON in the pixels of the image as its processor resized it). Exemplar reports come from an
index as in the project's own VLM (training studies only, never the row's own study or patient). Each step draws
`batch_size` examples at random; only the LoRA weights train (AdamW, warm-up then cosine). An image that cannot be
read is skipped and reported, never fatal. The folder written is what `cxr generate --vlm DIR` loads.
"""

from __future__ import annotations

import logging
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from generation.data.box_formats import format_boxes
from generation.data.boxes import NO_FINDINGS_TEXT
from generation.data.tasks import Example, build_examples
from generation.model.tokenizer import TASKS
from generation.writing.image_text_to_text import ImageTextToTextVLM, is_image_text_to_text, seen_sizes, to_pil
from retrieval.errors import CXRError, ImageReadError, UsageError

log = logging.getLogger(__name__)


@dataclass
class ImageTextToTextTrainConfig:
    """A LoRA fine-tuning run: the base model (hub id or local folder) and the optimisation."""

    base_model: str
    tasks: list[str] = field(default_factory=lambda: list(TASKS))
    rag_k: int = 3
    rag_dropout: float = 0.3  # share of examples trained without exemplars (so k = 0 still works)
    steps: int = 300
    batch_size: int = 4
    lr: float = 2e-4
    warmup: int = 10
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.05
    seed: int = 0
    split: str = "train"


def target_text(ex: Example, box_format: str, size: tuple[int, int] | None) -> str:
    """The example's answer in the model's own words: boxes (identify, ground, "where is") in its box format."""
    boxes = ex.info.get("boxes")
    if ex.task == "identify" and not boxes:
        return NO_FINDINGS_TEXT
    if boxes is not None and ex.task in ("identify", "ground", "vqa"):
        return format_boxes(box_format, boxes, size)
    return ex.target


def _read_rows(df: pd.DataFrame, rows: set[int], bad: dict[int, str]) -> dict[int, Any]:
    """PIL images of manifest rows; a row that cannot be read goes to `bad` (row -> reason) instead."""
    from generation.data.features import row_image_path
    from retrieval.data.image_io import read_image

    out = {}
    for r in rows:
        try:
            out[r] = to_pil(read_image(row_image_path(df, r)))
        except ImageReadError as e:
            bad[r] = str(e)
            log.warning("skipping row %d: %s", r, e)
    return out


def _exemplars(df: pd.DataFrame, rows: list[int], index_dir: str | Path | None, k: int) -> dict[int, list]:
    """Each training row's top-k exemplars from the index, training studies only (empty without an index)."""
    if index_dir is None or k <= 0:
        if k > 0:
            raise UsageError("--rag-k > 0 needs --index (or pass --rag-k 0 to train without retrieval)")
        return {}
    from generation.data.features import exemplars_for_rows, open_searcher

    studies = {str(s) for s in df.iloc[rows]["study_id"]}
    return exemplars_for_rows(df, rows, open_searcher(index_dir), k, allowed_studies=studies)


def train_step(vlm: ImageTextToTextVLM, optim: Any, sched: Any, batch: list[Example], images: dict[int, Any],
               exemplars: dict[int, list]) -> float:  # fmt: skip
    """One optimiser step on `batch` (examples whose row has an image); returns the loss."""
    pil = [images[ex.row] for ex in batch]
    sizes = seen_sizes(vlm.processor, pil)
    fmt = vlm.config.box_format
    targets = [target_text(ex, fmt, s) for ex, s in zip(batch, sizes, strict=True)]
    texts = vlm.prompts([e.task for e in batch], [e.prompt for e in batch], [exemplars.get(e.row, []) for e in batch])
    vlm.model.train()
    loss = vlm.loss(pil, texts, targets)
    loss.backward()
    torch.nn.utils.clip_grad_norm_([p for p in vlm.model.parameters() if p.requires_grad], 1.0)
    optim.step()
    sched.step()
    optim.zero_grad(set_to_none=True)
    return float(loss.detach())


def optimiser(vlm: ImageTextToTextVLM, config: ImageTextToTextTrainConfig) -> tuple[Any, Any]:
    """AdamW over the trainable (LoRA) weights only, with a linear warm-up then a cosine decay."""
    from transformers import get_cosine_schedule_with_warmup

    params = [p for p in vlm.model.parameters() if p.requires_grad]
    optim = torch.optim.AdamW(params, lr=config.lr, weight_decay=0.0)
    return optim, get_cosine_schedule_with_warmup(optim, min(config.warmup, config.steps), config.steps)


def train_image_text_to_text(
    manifest: str | Path | pd.DataFrame,
    out_dir: str | Path,
    config: ImageTextToTextTrainConfig,
    index_dir: str | Path | None = None,
    device: str | None = None,
) -> dict:
    """Fine-tune `config.base_model` with LoRA on the manifest's training split; writes `out_dir`; returns run info."""
    from retrieval.data.manifest import read_manifest
    from retrieval.data.split_items import split_positions
    from retrieval.device import resolve_device
    from retrieval.fileio import write_json_atomic

    out = Path(out_dir)
    if is_image_text_to_text(out):
        raise UsageError(f"{out} already holds a fine-tuned VLM; choose another --out")
    t0 = time.time()
    torch.manual_seed(config.seed)
    rng = random.Random(config.seed)
    df = manifest if isinstance(manifest, pd.DataFrame) else read_manifest(manifest)
    rows = split_positions(df, config.split)
    examples = [e for exs in build_examples(df, config.tasks, rows, seed=config.seed).values() for e in exs]
    if not examples:
        raise CXRError(f"the {config.split} split yields no examples for tasks {config.tasks}")
    bad: dict[int, str] = {}
    images = _read_rows(df, {e.row for e in examples}, bad)
    examples = [e for e in examples if e.row in images]
    if not examples:
        raise CXRError("no readable training image")
    exemplars = _exemplars(df, sorted(images), index_dir, config.rag_k)
    vlm = ImageTextToTextVLM.create(
        config.base_model, resolve_device(device), config.lora_r, config.lora_alpha, config.lora_dropout
    )
    vlm.config.tasks = sorted({e.task for e in examples}, key=list(TASKS).index)
    optim, sched = optimiser(vlm, config)
    losses = []
    for step in range(config.steps):
        batch = [examples[rng.randrange(len(examples))] for _ in range(config.batch_size)]
        context = {e.row: exemplars.get(e.row, []) if rng.random() >= config.rag_dropout else [] for e in batch}
        losses.append(train_step(vlm, optim, sched, batch, images, context))
        if step % 10 == 0 or step == config.steps - 1:
            log.info("step %d/%d loss %.4f", step + 1, config.steps, losses[-1])
    vlm.save(out)
    info = {
        "config": asdict(config),
        "base_model": vlm.config.base_model,
        "model_type": vlm.config.model_type,
        "box_format": vlm.config.box_format,
        "index": str(index_dir) if index_dir else None,
        "task_sizes": {t: sum(e.task == t for e in examples) for t in vlm.config.tasks},
        "bad_rows": [{"row": r, "reason": why} for r, why in sorted(bad.items())],
        "steps": config.steps,
        "loss_first": float(np.mean(losses[:10])),
        "loss_last": float(np.mean(losses[-10:])),
        "losses": losses,
        "params_trainable": int(sum(p.numel() for p in vlm.model.parameters() if p.requires_grad)),
        "seconds": round(time.time() - t0, 1),
    }
    write_json_atomic(out / "train_info.json", info)
    return info
