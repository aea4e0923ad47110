"""What every condition of one generation evaluation reads, prepared once: the split's examples (a seeded sample
per task), their visual tokens, their exemplars (training studies only) and the constant answers."""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from generation.data.tasks import Example, build_examples
from generation.evaluation.baselines import constant_answers
from generation.evaluation.prior_answers import TrainingPrior, fit_prior


def cap_examples(examples: dict[str, list[Example]], max_per_task: int | None, seed: int) -> dict[str, list[Example]]:
    """At most `max_per_task` examples per task: a sample seeded by (seed, task), so a task's sample is the same
    whichever other tasks are evaluated with it."""
    if not max_per_task:
        return examples
    return {
        t: (random.Random(f"{seed}:{t}").sample(exs, max_per_task) if len(exs) > max_per_task else exs)
        for t, exs in examples.items()
    }


@dataclass
class EvalInputs:
    """What every condition of one evaluation reads: examples, visual tokens, exemplars, baselines."""

    df: pd.DataFrame
    rows: list[int]
    examples: dict[str, list[Example]]
    visual: dict
    bad: list[dict]
    exemplars: dict[int, list]
    study_rows: dict[str, int]
    by_prompt: dict
    by_task: dict
    available: dict[str, int]  # examples per task in the split, before the `max_per_task` sample
    prior: TrainingPrior  # the image-free training prior's answers (prior_answers.py)


def eval_inputs(
    gen: Any,
    df: pd.DataFrame,
    tasks: Sequence[str],
    split: str,
    ks: Sequence[int],
    max_per_task: int | None,
    seed: int,
    progress: bool,
    retrieval_model: Any,
    retrieval_target: str,
    token_cache: str | Path | None,
) -> EvalInputs:
    """The split's examples (capped per task; rows whose image cannot be read dropped), their visual tokens and
    exemplars (training studies only), the first training row per study and the constant answers."""
    from generation.data.features import exemplars_for_rows, visual_tokens_for_rows
    from retrieval.data.split_items import split_positions

    rows = split_positions(df, split)
    train_rows = split_positions(df, "train")
    every = build_examples(df, tasks, rows, seed=seed)
    examples = cap_examples(every, max_per_task, seed)
    used = sorted({e.row for exs in examples.values() for e in exs})
    visual, bad = visual_tokens_for_rows(df, used, gen.encoders, gen.grid, progress=progress, cache_dir=token_cache)
    examples = {t: [e for e in exs if e.row in visual] for t, exs in examples.items()}
    examples = {t: exs for t, exs in examples.items() if exs}

    exemplars: dict[int, list] = {}
    if gen.searcher is not None:
        train_studies = {str(s) for s in df.iloc[train_rows]["study_id"]}
        exemplars = exemplars_for_rows(
            df,
            sorted(visual),
            gen.searcher,
            max([*ks, 1]),
            allowed_studies=train_studies,
            model=retrieval_model or gen.retrieval_model,  # loaded only for images outside the index
            target=retrieval_target,
        )
    study_rows: dict[str, int] = {}
    for pos in train_rows:
        study_rows.setdefault(str(df.iloc[pos]["study_id"]), pos)
    train_examples = build_examples(df, tasks, train_rows, seed=seed)
    by_prompt, by_task = constant_answers(train_examples)
    available = {t: len(exs) for t, exs in every.items()}
    prior = fit_prior(train_examples, [list(df.iloc[r]["labels"]) for r in train_rows])
    return EvalInputs(df, rows, examples, visual, bad, exemplars, study_rows, by_prompt, by_task, available, prior)
