"""Pooled text-tower features: computed once per distinct text in batches of similar length, and a store of them
kept beside a saved model.

* The tokenizer pads a batch to its longest text, so sorting the distinct texts by length before batching saves
  most of the padding (IU X-ray reports run from 35 to 128 tokens).
* A model folder may hold `text_features.safetensors`: the pooled (pre-projector) features of the texts a training
  run saw with a frozen text tower, keyed by the sha256 of each text, valid only for the text tower whose weights
  hash (`checkpoint.fingerprint_state` of its state dict) it records. `CXRModel.encode_texts` looks texts up there
  before running the tower, so indexing the training reports right after training (`cxr demo`) does not encode
  them a second time. A store whose hash differs from the tower's is ignored, never trusted.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch

from retrieval.fileio import atomic_path
from retrieval.progress import make_progress

STORE_FILE = "text_features.safetensors"
STORE_PRECISION = "fp32"  # training computes a frozen tower's features without autocast


def text_digests(texts: Sequence[str]) -> np.ndarray:
    """(N, 32) uint8: the sha256 of each text (UTF-8)."""
    out = np.zeros((len(texts), 32), dtype=np.uint8)
    for i, t in enumerate(texts):
        out[i] = np.frombuffer(hashlib.sha256(str(t).encode()).digest(), dtype=np.uint8)
    return out


def save_store(folder: str | Path, texts: Sequence[str], features: torch.Tensor, tower: str) -> Path:
    """Write the store of `texts` -> pooled `features` (one row each; repeats kept once) for tower hash `tower`."""
    from safetensors.torch import save_file

    first: dict[str, int] = {}
    for i, t in enumerate(texts):
        first.setdefault(str(t), i)
    rows = list(first.values())
    path = Path(folder) / STORE_FILE
    tensors = {
        "sha256": torch.from_numpy(text_digests(list(first))),
        "features": features[rows].float().contiguous(),
    }
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata={"text_tower": tower, "precision": STORE_PRECISION})
    return path


def load_store(folder: str | Path | None, tower: str) -> dict[bytes, torch.Tensor]:
    """{sha256 digest: pooled feature} from the folder's store when it was made by the tower with hash `tower`;
    an empty dict when there is no store, it belongs to other weights, or it cannot be read."""
    from safetensors import safe_open

    path = Path(folder) / STORE_FILE if folder else None
    if path is None or not path.is_file():
        return {}
    try:
        with safe_open(str(path), framework="pt") as f:
            if (f.metadata() or {}).get("text_tower") != tower:
                return {}
            digests = f.get_tensor("sha256").numpy()
            feats = f.get_tensor("features")
    except Exception:  # a damaged store only costs speed: encode instead
        return {}
    return {d.tobytes(): feats[i] for i, d in enumerate(digests)}


def pooled_features(
    featurize: Callable[[list[str]], torch.Tensor],
    texts: Sequence[str],
    batch_size: int = 64,
    known: dict[bytes, torch.Tensor] | None = None,
    show_progress: bool = False,
    desc: str = "text features",
) -> torch.Tensor:
    """(N, D) float32 features of `texts` in input order. `featurize(list of texts)` runs the tower on one batch.

    Each distinct text is featurized once, in batches sorted by length; texts found in `known` (by sha256) are
    taken from there instead."""
    texts = [str(t) for t in texts]
    unique = sorted(set(texts), key=lambda t: (len(t), t))
    where = {t: i for i, t in enumerate(unique)}
    feats: list[torch.Tensor | None] = [None] * len(unique)
    if known:
        for i, d in enumerate(text_digests(unique)):
            feats[i] = known.get(d.tobytes())
    todo = [i for i, f in enumerate(feats) if f is None]
    bs = max(1, int(batch_size))
    with make_progress(disable=not show_progress or not todo, transient=True) as progress:
        task = progress.add_task(desc, total=len(todo), unit="texts")
        for s in range(0, len(todo), bs):
            idx = todo[s : s + bs]
            with torch.no_grad():
                out = featurize([unique[i] for i in idx]).float().cpu()
            for j, i in enumerate(idx):
                feats[i] = out[j]
            progress.advance(task, len(idx))
    if not unique:
        return torch.zeros(0)
    table = torch.stack(feats)  # type: ignore[arg-type]
    return table[torch.tensor([where[t] for t in texts], dtype=torch.long)]
