"""The VLM's collator: token-id lists -> padded tensors, with the image's place in each row.

A row is `[image] [prompt] [answer] [eos]` for teacher forcing (right-padded; labels are the answer and eos,
-100 elsewhere) and `[pad ...] [image] [prompt]` for generation (left-padded, so every row's next token comes
at the same position). The image enters as `n_image` embeddings, not ids: the collator pads the text and says
where in each row the image goes (`image_at`); `VLM.forward` and `VLM.generate` splice it in there.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

IGNORE = -100  # the label of positions without a loss (transformers' convention)


@dataclass
class VLMBatch:
    """A collated batch: `ids` (B, L) padded text; `attention_mask` (B, n_image + L) over the spliced rows;
    `labels` (B, n_image + L) or None (generation); `image_at[i]`: the text position the image precedes."""

    ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor | None
    image_at: list[int]


def collate(
    prompts: Sequence[Sequence[int]],
    targets: Sequence[Sequence[int]] | None,
    n_image: int,
    pad_id: int,
    eos_id: int | None,
) -> VLMBatch:
    """With `targets`: right-padded training rows `prompt + target + [eos]` with answer-only labels (no eos
    when `eos_id` is None: scoring a given answer). Without: left-padded prompts for generation."""
    if targets is None:
        seqs = [list(p) for p in prompts]
    else:
        end = [] if eos_id is None else [eos_id]
        seqs = [list(p) + list(t) + end for p, t in zip(prompts, targets, strict=True)]
    length = max(map(len, seqs))
    b = len(seqs)
    ids = torch.full((b, length), pad_id, dtype=torch.long)
    mask = torch.zeros((b, n_image + length), dtype=torch.long)
    if targets is None:
        for i, s in enumerate(seqs):
            ids[i, length - len(s) :] = torch.tensor(s, dtype=torch.long)
            mask[i, length - len(s) :] = 1
        return VLMBatch(ids, mask, None, [length - len(s) for s in seqs])
    labels = torch.full((b, n_image + length), IGNORE, dtype=torch.long)
    for i, (s, p) in enumerate(zip(seqs, prompts, strict=True)):
        ids[i, : len(s)] = torch.tensor(s, dtype=torch.long)
        labels[i, n_image + len(p) : n_image + len(s)] = torch.tensor(s[len(p) :], dtype=torch.long)
        mask[i, : n_image + len(s)] = 1
    return VLMBatch(ids, mask, labels, [0] * b)


def splice_image(image: torch.Tensor, text: torch.Tensor, image_at: Sequence[int]) -> torch.Tensor:
    """(B, n_image, H) image embeddings placed into (B, L, H) text embeddings before position `image_at[i]`."""
    if not any(image_at):
        return torch.cat([image, text], dim=1)
    return torch.stack([torch.cat([text[i, :k], image[i], text[i, k:]], dim=0) for i, k in enumerate(image_at)])
