"""Pooled text-tower features: computed once per distinct text in batches of similar length, and a store of them
kept beside a saved model.

* The tokenizer pads a batch to its longest text, so sorting the distinct texts by length before batching saves
  most of the padding (IU X-ray reports run from 35 to 128 tokens).
* A model folder may hold `text_features.safetensors` (see feature_store.py): the pooled features of the texts a
  training run saw with a frozen text tower, keyed by the sha256 of each text. `CXRModel.encode_texts` looks texts
  up there before running the tower.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from retrieval.models import feature_store
from retrieval.progress import make_progress

STORE_FILE = feature_store.TEXT_STORE
STORE_PRECISION = "fp32"  # training computes a frozen tower's features without autocast on the CPU
text_digests = feature_store.text_digests


def save_store(folder: str | Path, texts: Sequence[str], features: torch.Tensor, tower: str) -> Path:
    """Write the store of `texts` -> pooled `features` (one row each; repeats kept once) for tower hash `tower`."""
    path = Path(folder) / STORE_FILE
    return feature_store.save_store(path, text_digests(texts), features, tower, STORE_PRECISION)


def load_store(folder: str | Path | None, tower: str) -> dict[bytes, torch.Tensor]:
    """{sha256 digest: pooled feature} from the folder's store when it was made by the tower with hash `tower`."""
    return feature_store.load_store(Path(folder) / STORE_FILE if folder else None, tower, STORE_PRECISION)


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
