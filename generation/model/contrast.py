"""Context-contrastive decoding: make the LM follow what its prompt says, not only what reports usually say.

A LoRA-tuned LM reads the "Likely findings" line (a "right pleural effusion" line makes a report with one several
nats likelier than a "none" line), yet the likeliest report under either line is the stock normal one, because
normal reports are more alike; beam search, which seeks that mode, then writes "the lungs are clear". Context-aware
decoding (Shi et al. 2023, "Trusting Your Evidence") scores each next token by how much the evidence changes it:

    score = (1 + alpha) * log p(token | prompt) - alpha * log p(token | contrast prompt)

where the contrast prompt is the same prompt with the evidence taken out (here the line says "none" and the image is
left out). alpha = 0 is plain decoding. With one beam the contrast pass keeps its own KV cache (one new token per
step); with beams, which reorder between steps, it is recomputed over the contrast prompt and the tokens generated
so far at every step, which costs one full forward pass per step.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from transformers import LogitsProcessor, LogitsProcessorList

from generation.model.collate import collate


class ContrastLogitsProcessor(LogitsProcessor):
    """(1 + alpha) * log_softmax(scores) - alpha * log_softmax(the LM's logits after the contrast prompt + the
    tokens generated so far); `prompts` are one contrast prompt per batch row, each repeated for its `num_beams`."""

    def __init__(self, lm, prompts: Sequence[list[int]], pad_id: int, alpha: float, num_beams: int = 1):
        batch = collate(prompts, None, 0, pad_id, None)  # left-padded, no image
        self.lm, self.alpha, self.cached = lm, float(alpha), num_beams == 1
        self.ids = batch.ids.repeat_interleave(num_beams, dim=0)
        self.mask = batch.attention_mask.repeat_interleave(num_beams, dim=0)
        self.cache, self.seen = None, -1  # the KV cache after the prompt + `seen` generated tokens (one beam only)

    @torch.no_grad()
    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        device = scores.device
        ids = torch.cat([self.ids.to(device), input_ids.to(device)], dim=1)
        mask = torch.cat([self.mask.to(device), torch.ones_like(input_ids, device=device)], dim=1)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)  # left padding: positions count real tokens only
        step = self.cache is not None and input_ids.shape[1] == self.seen + 1
        if step:  # one beam: only the newest token goes through, after the cached ones
            ids, positions = ids[:, -1:], positions[:, -1:]
        out = self.lm(
            input_ids=ids,
            attention_mask=mask,
            position_ids=positions,
            cache=self.cache if step else None,
            use_cache=self.cached,
        )
        if self.cached:
            self.cache, self.seen = out.cache, input_ids.shape[1]
        logits = out.logits[:, -1].float()
        plain = F.log_softmax(scores.float(), dim=-1)
        return (1 + self.alpha) * plain - self.alpha * F.log_softmax(logits, dim=-1)


def contrast_processors(vlm, prompts: Sequence[list[int]], alpha: float, num_beams: int = 1) -> LogitsProcessorList:
    """The `logits_processor` argument of `VLM.generate` for contrastive decoding against `prompts`."""
    return LogitsProcessorList([ContrastLogitsProcessor(vlm.lm, prompts, vlm.tok.pad_token_id, alpha, num_beams)])
