"""The LM's own answer to a closed question ("is there X?"): "yes" or "no", whichever it finds more likely.

A pretrained chat LM answers in sentences ("Yes, the image shows ..."), and a fine-tuned one may add words; exact
match scores both as wrong although the LM's choice is clear. As closed-set VQA evaluation does for LLaVA-style
models, the LM scores the two answers instead: the summed log-probability of each, after the image and the
prompt, the larger wins (each answer in lower case and capitalised, the better of the two forms counts). The
answer is the LM's, not the finding head's (`head.closed_answer` is that one), although a LM prompted with the
head's "Likely findings" line reads the head's opinion there.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from generation.heads.head import closed_finding

ANSWERS = ("yes", "no")


def is_closed(question: str) -> bool:
    """True for a closed question about a known finding ("is there cardiomegaly?")."""
    return closed_finding(question) is not None


def lm_closed_answers(vlm, visual: torch.Tensor, prompt_ids: Sequence[list[int]]) -> list[str]:
    """ "yes"/"no" for each row: the answer the VLM's LM gives the higher log-likelihood after the row's image
    `visual[i]` and prompt ids (each answer's better form of lower case / capitalised)."""
    if not len(prompt_ids):
        return []
    scores = []
    for word in ANSWERS:
        forms = [vlm.tok(form, add_special_tokens=False)["input_ids"] for form in (word, word.capitalize())]
        best = torch.stack([vlm.answer_log_likelihood(visual, prompt_ids, [f] * len(prompt_ids)) for f in forms])
        scores.append(best.max(dim=0).values)
    pick = torch.stack(scores).argmax(dim=0)
    return [ANSWERS[int(i)] for i in pick]
