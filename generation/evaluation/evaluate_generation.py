"""`cxr eval generation`: every task of a trained VLM on one split, with its baselines in the same run.

Conditions (one table row each):
- `constant`: the most common training answer for the same task and prompt (e.g. the most common report; for
  `[ground]` the phrase's mean training box);
- `training prior`: what the training split alone answers (`prior_answers.py`: the mean box per finding and image
  half scored by prevalence for `[identify]`, the findings by prevalence for `[classify]` and closed VQA);
- `retrieval-only`: the answer of the top-1 retrieved training study (its report, labels or boxes);
- `vlm k=0`: the VLM without retrieval;  `vlm k=K`: the VLM with the top-K retrieved reports in its prompt, for
  every K asked for (e.g. 1, 3, 5 in one table).
Exemplars never come from the query's own study or patient, and only from the training split.

Besides each task's metrics: the share of reports that repeat a sentence, the share of generated boxes that are
malformed (they count as no box), the closed-VQA "yes" rate for findings that are present, and, for RAG, how
often the top-k exemplars share a finding with the query and how often the output copies their sentences
(`rag` in the result: the numbers that explain whether RAG can help).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from generation.data.tasks import Example
from generation.evaluation.baselines import baseline_answers, shuffle_between_images
from generation.evaluation.eval_inputs import EvalInputs, eval_inputs
from generation.evaluation.task_scores import score_task
from generation.model.tokenizer import TASKS
from generation.writing.generator_options import GeneratorOptions
from retrieval.labels import LABELS, NO_FINDING, is_abnormal
from retrieval.study_text import normalized_sentences as sentences


def rag_diagnostics(
    df: pd.DataFrame, study_rows: dict[str, int], examples: Sequence[Example], exemplars: dict, k: int
) -> dict:
    """How informative the top-k exemplars are for abnormal queries: the share whose top-1 / any of top-k shares
    a finding with the query, and the mean share of the query's findings the top-k cover."""
    top1 = anyk = 0
    cover: list[float] = []
    for e in examples:
        want = {x for x in df.iloc[e.row]["labels"] if x in LABELS} - {NO_FINDING}
        if not want:
            continue
        got = []
        for x in exemplars.get(e.row, [])[:k]:
            pos = study_rows.get(str(x.study_id))
            got.append(set(df.iloc[pos]["labels"]) if pos is not None else set())
        top1 += bool(got and got[0] & want)
        anyk += any(g & want for g in got)
        cover.append(len(want & set().union(*got)) / len(want) if got else 0.0)
    n = len(cover)
    return {
        "abnormal_queries": n,
        "top1_shares_finding": top1 / n if n else float("nan"),
        "topk_shares_finding": anyk / n if n else float("nan"),
        "findings_covered": float(np.mean(cover)) if n else float("nan"),
    }


def copy_rate(outputs: Sequence[dict]) -> float:
    """Share of generated report sentences that appear verbatim in one of the prompt's exemplars."""
    total = sum(len(sentences(o["text"])) for o in outputs)
    copied = sum(len({s for c in o.get("copied", []) for s in c["sentences"]}) for o in outputs)
    return copied / total if total else float("nan")


def _vlm_outputs(gen: Any, data: EvalInputs, task: str, exs: Sequence[Example], k: int) -> list[dict]:
    """The VLM's outputs for the examples, each prompt carrying its row's top-`k` exemplars."""
    import torch

    vis = torch.stack([data.visual[e.row] for e in exs]).float()
    ctx = [data.exemplars.get(e.row, [])[:k] for e in exs]
    return gen.generate(vis, [task] * len(exs), [e.prompt for e in exs], ctx)


def _samples(df: pd.DataFrame, cond: str, exs: Sequence[Example], outs: Sequence[dict]) -> list[dict]:
    """Up to three abnormal and one normal output of a condition, for the results file."""
    abnormal = [i for i, e in enumerate(exs) if _is_abnormal_row(df, e.row)]
    normal = [i for i in range(len(exs)) if i not in set(abnormal)]
    return [
        {
            "condition": cond,
            "prompt": exs[i].prompt,
            "target": exs[i].target,
            "output": outs[i]["text"],
            "exemplars": outs[i]["exemplars"],
        }
        for i in abnormal[:3] + normal[:1]
    ]


def evaluate_generation(
    vlm_dir: str | Path,
    manifest: str | Path | pd.DataFrame,
    index_dir: str | Path | None = None,
    split: str = "test",
    k: int | Sequence[int] = 3,
    tasks: Sequence[str] | None = None,
    max_per_task: int | None = 300,
    meteor: bool = True,
    seed: int = 0,
    progress: bool = True,
    retrieval_model: Any = None,
    retrieval_target: str = "reports",
    token_cache: str | Path | None = None,
    decoding: dict | None = None,
    constrain_boxes: bool = True,
    options: GeneratorOptions | None = None,
    image_control: str = "real",
    shuffled: bool = False,
) -> dict:
    """Metrics per task and condition (constant, retrieval-only, VLM k=0, VLM k=K for each K in `k`; with
    `shuffled`, the last VLM condition's answers shuffled between the test images); `options` says where the
    `Generator`'s answers come from. `image_control` (`image_controls.py`): `blank`, `noise` or `other` replace
    every test image."""
    from generation.writing.generate import Generator
    from retrieval.data.manifest import read_manifest

    t0 = time.time()
    df = manifest if isinstance(manifest, pd.DataFrame) else read_manifest(manifest)
    ks = sorted({int(x) for x in ([k] if isinstance(k, int) else k) if int(x) > 0})
    gen = Generator(
        vlm_dir, index_dir, retrieval_model=retrieval_model, decoding=decoding, constrain_boxes=constrain_boxes,
        options=options,
    )  # fmt: skip
    tasks = [t for t in (tasks or gen.vlm.config.tasks or TASKS)]
    data = eval_inputs(
        gen, df, tasks, split, ks, max_per_task, seed, progress, retrieval_model, retrieval_target, token_cache
    )
    if image_control != "real":
        from generation.data.image_controls import apply_image_control
        from retrieval.data.split_items import split_positions

        train = {str(s) for s in df.iloc[split_positions(df, "train")]["study_id"]}
        kmax = max([*ks, 1])
        data.visual, data.exemplars = apply_image_control(
            gen, data.visual, data.exemplars, df, image_control, kmax, train, seed
        )
    conditions = ["constant", "training prior"] + (["retrieval-only"] if data.exemplars else []) + ["vlm k=0"]
    if data.exemplars and gen.vlm.config.rag_k:
        conditions += [f"vlm k={kk}" for kk in ks]
    conditions += ["shuffled"] if shuffled else []
    run = _Run(gen, data, meteor, seed)
    results = {task: run.score_conditions(task, exs, conditions) for task, exs in data.examples.items()}
    return {
        "vlm": str(vlm_dir),
        "index": str(index_dir) if index_dir else None,
        "split": split,
        "k": ks,
        "retrieval_target": retrieval_target,
        "image_control": image_control,
        "rag": run.rag,
        "generation_seconds": run.seconds,
        "seconds_per_output": {
            c: round(v / max(1, len(data.examples[c.split("/")[0]])), 4) for c, v in run.seconds.items()
        },
        "rows": len(data.rows),
        "examples_available": data.available,  # n in a table is a seeded sample of these when it is smaller
        "bad_rows": data.bad,
        "tasks": results,
        "samples": run.samples,
        "seconds": round(time.time() - t0, 1),
    }


class _Run:
    """One evaluation's conditions scored task by task, collecting the RAG diagnostics, samples and timings."""

    def __init__(self, gen: Any, data: EvalInputs, meteor: bool, seed: int):
        self.gen, self.data, self.meteor, self.seed = gen, data, meteor, seed
        self.rag: dict[str, dict] = {}
        self.samples: dict[str, list] = {}
        self.seconds: dict[str, float] = {}

    def score_conditions(self, task: str, exs: Sequence[Example], conditions: Sequence[str]) -> dict[str, dict]:
        """{condition: metrics} for one task; `shuffled` reuses the condition before it (the last VLM one)."""
        data, out = self.data, {}
        answers: list = []
        boxes = detections = None
        for cond in conditions:
            if cond == "shuffled":  # the last VLM condition's answers, each given to another test image
                prompts = [e.prompt for e in exs]
                answers, boxes, detections = (
                    shuffle_between_images(v, prompts, self.seed) for v in (answers, boxes, detections)
                )
            elif not cond.startswith("vlm"):
                answers, boxes, detections = baseline_answers(data, cond, task, exs)
            else:
                kk = int(cond.split("=")[1])
                t1 = time.time()
                outs = _vlm_outputs(self.gen, data, task, exs, kk)
                self.seconds[f"{task}/{cond}"] = round(time.time() - t1, 2)
                answers, boxes = [o["text"] for o in outs], [o.get("boxes") for o in outs]
                detections = [o.get("detections") for o in outs]
                if task == "report" and kk > 0:
                    self.rag[f"k={kk}"] = {
                        **rag_diagnostics(data.df, data.study_rows, exs, data.exemplars, kk),
                        "output_sentences_copied": copy_rate(outs),
                    }
                self.samples.setdefault(task, []).extend(_samples(data.df, cond, exs, outs))
            out[cond] = {"n": len(exs), **score_task(task, exs, answers, self.meteor, boxes, detections)}
        return out


def _is_abnormal_row(df: pd.DataFrame, pos: int) -> bool:
    return is_abnormal(df.iloc[pos]["labels"])
