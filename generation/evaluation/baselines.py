"""The image-free baselines of `cxr eval generation`, scored beside the VLM in the same run: the constant answer
(the most common training answer for the task and prompt; for `[ground]` the phrase's mean training box), the
top-1 retrieved training study's own answer (`retrieval-only`), the image-free training prior (`training prior`,
prior_answers.py), and the VLM's answers shuffled between the test images asked the same prompt (`shuffled`: what
is left of a score when the answer is not about this image)."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from generation.data.boxes import format_box
from generation.data.tasks import Example, row_examples

if TYPE_CHECKING:
    from generation.evaluation.eval_inputs import EvalInputs

DEFAULT_ANSWER = {
    "report": "",
    "vqa": "no",
    "classify": "No Finding",
    "identify": "no findings",
    "ground": "",
}


def constant_answers(train_examples: dict[str, list[Example]]) -> tuple[dict, dict]:
    """The constant baseline per (task, prompt) and per task, from the training examples: the most common
    target, except for `[ground]` where it is the mean training box of the phrase (boxes rarely repeat)."""
    by_prompt: dict[tuple[str, str], Counter] = {}
    by_task: dict[str, Counter] = {}
    boxes: dict[str, list[dict]] = {}
    for t, exs in train_examples.items():
        for e in exs:
            by_prompt.setdefault((t, e.prompt), Counter())[e.target] += 1
            by_task.setdefault(t, Counter())[e.target] += 1
            if t == "ground" and e.info.get("boxes"):
                boxes.setdefault(e.prompt, []).append(e.info["boxes"][0])
    const = {k: c.most_common(1)[0][0] for k, c in by_prompt.items()}
    for phrase, bs in boxes.items():
        mean = {k: float(np.mean([b[k] for b in bs])) for k in ("x1", "y1", "x2", "y2")}
        const[("ground", phrase)] = format_box(mean)
    return const, {k: c.most_common(1)[0][0] for k, c in by_task.items()}


def retrieval_answer(df: pd.DataFrame, study_rows: dict[str, int], ex: Example, exemplars: Sequence) -> str:
    """The top-1 retrieved study's own answer to the same task and prompt (its report, labels, boxes)."""
    if not exemplars:
        return DEFAULT_ANSWER[ex.task]
    top = exemplars[0]
    if ex.task == "report":
        return top.report
    pos = study_rows.get(str(top.study_id))
    if pos is None:
        return DEFAULT_ANSWER[ex.task]
    for other in row_examples(df.iloc[pos].to_dict(), pos, [ex.task]):
        if other.prompt == ex.prompt:
            return other.target
    if ex.task == "vqa" and ex.prompt.startswith("is there"):
        return "no"
    return DEFAULT_ANSWER[ex.task]


def baseline_answers(data: EvalInputs, cond: str, task: str, exs: Sequence[Example]) -> tuple[list, Any, Any]:
    """The `constant`, `training prior` (prior_answers.py) or `retrieval-only` answers, with their boxes and scored
    detections where the baseline has them (the prior's `[identify]`), else None."""
    const = [data.by_prompt.get((task, e.prompt), data.by_task.get(task, DEFAULT_ANSWER[task])) for e in exs]
    if cond == "constant":
        return const, None, None
    if cond == "training prior":
        answers, boxes, dets = zip(*(data.prior.answer(e, c) for e, c in zip(exs, const, strict=True)), strict=True)
        boxed = task == "identify"
        return list(answers), (list(boxes) if boxed else None), (list(dets) if boxed else None)
    return [retrieval_answer(data.df, data.study_rows, e, data.exemplars.get(e.row, [])) for e in exs], None, None


def shuffle_between_images(values: Sequence | None, prompts: Sequence[str], seed: int) -> list | None:
    """`values` (one per test example) each given to another test image asked the same prompt (a derangement
    within each prompt, seeded by `seed`: shuffled answers stay answers to the question asked)."""
    if values is None:
        return None
    from generation.data.image_controls import prompt_derangement

    order = prompt_derangement(list(prompts), np.random.default_rng(seed))
    return [values[i] for i in order]
