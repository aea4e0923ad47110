"""`cxr eval generation`: every task of a trained VLM on one split, with its baselines in the same run.

Conditions (one table row each):
- `constant`: the most common training answer for the same task and prompt (e.g. the most common report; for
  `[ground]` the phrase's mean training box);
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

import random
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from generation.data.boxes import format_box, malformed_boxes, parse_boxes
from generation.data.tasks import Example, build_examples, row_examples
from generation.evaluation.metrics import (
    clinical_efficacy,
    grounding_iou,
    localisation_accuracy,
    map50,
    multilabel_prf,
    parse_label_list,
    repeated_sentence_fraction,
    text_metrics,
    vqa_accuracy,
)
from generation.model.tokenizer import TASKS
from retrieval.labels import LABELS, NO_FINDING, is_abnormal
from retrieval.study_text import normalized_sentences as sentences

DEFAULT_ANSWER = {
    "report": "",
    "vqa": "no",
    "classify": "No Finding",
    "identify": "no findings",
    "ground": "",
}


def _cap(examples: dict[str, list[Example]], max_per_task: int | None, seed: int) -> dict[str, list[Example]]:
    """At most `max_per_task` examples per task: a sample seeded by (seed, task), so a task's sample is the same
    whichever other tasks are evaluated with it."""
    if not max_per_task:
        return examples
    return {
        t: (random.Random(f"{seed}:{t}").sample(exs, max_per_task) if len(exs) > max_per_task else exs)
        for t, exs in examples.items()
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


def score_task(
    task: str,
    examples: Sequence[Example],
    answers: Sequence[str],
    meteor: bool = True,
    boxes: Sequence[Sequence[dict] | None] | None = None,
    detections: Sequence[Sequence[dict] | None] | None = None,
) -> dict:
    """The task's metrics for answers aligned with examples; `boxes`: each answer's boxes as the generator
    gave them, else parsed from the text; `detections`: each image's scored candidate boxes (the box head's
    every finding group), else the answer's boxes.

    `[identify]`: Acc@IoU reads the answer; `map@0.5` is COCO's protocol, every scored detection ranked by score
    (the answer's boxes by their rank where the model gives no other candidates); `map@0.5_answer` ranks the
    answer's boxes alone."""
    refs = [e.target for e in examples]
    if task == "report":
        return {
            **text_metrics(refs, answers, meteor=meteor),
            **{f"ce_{k}": v for k, v in clinical_efficacy(refs, answers).items()},
            "repeat_sentence": repeated_sentence_fraction(answers),
        }
    if task == "classify":
        prf = multilabel_prf([parse_label_list(r) for r in refs], [parse_label_list(a) for a in answers])
        return {**prf, "exact_match": vqa_accuracy(refs, answers)}
    if task == "vqa":
        out: dict[str, Any] = {"accuracy": vqa_accuracy(refs, answers)}
        for kind in ("closed", "open", "where"):
            sel = [i for i, e in enumerate(examples) if e.info.get("kind") == kind]
            if sel:
                out[f"accuracy_{kind}"] = vqa_accuracy([refs[i] for i in sel], [answers[i] for i in sel])
        present = [i for i, e in enumerate(examples) if e.info.get("kind") == "closed" and e.target == "yes"]
        if present:  # "is there X?" for an X the study has (so an abnormal study): answered yes
            out["yes_when_present"] = vqa_accuracy(["yes"] * len(present), [answers[i] for i in present])
        where = [i for i, e in enumerate(examples) if e.info.get("kind") == "where"]
        if where:
            g = grounding_iou([examples[i].info["boxes"] for i in where], [parse_boxes(answers[i]) for i in where])
            out["where_mean_iou"] = g["mean_iou"]
        return out
    if task == "identify":
        truth = [e.info.get("boxes", []) for e in examples]
        preds = [
            list(b) if b is not None else parse_boxes(a, LABELS)
            for a, b in zip(answers, boxes or [None] * len(answers), strict=True)
        ]
        dets = [list(d) if d is not None else p for p, d in zip(preds, detections or [None] * len(preds), strict=True)]
        normal = [i for i, e in enumerate(examples) if not e.info.get("boxes")]
        out = {
            **localisation_accuracy(truth, preds),
            "map@0.5": map50(truth, dets),
            "map@0.5_answer": map50(truth, preds),
            **_malformed(answers),
        }
        if normal:
            out["normal_says_no_findings"] = float(np.mean([not preds[i] for i in normal]))
        return out
    if task == "ground":
        return {
            **grounding_iou([e.info["boxes"] for e in examples], [parse_boxes(a) for a in answers]),
            **_malformed(answers),
        }
    raise ValueError(task)


def _malformed(answers: Sequence[str]) -> dict:
    """Share of box attempts in the answers that are malformed (scored as no box)."""
    counts = [malformed_boxes(a) for a in answers]
    attempts = sum(c[0] for c in counts)
    return {"malformed_boxes": (sum(c[1] for c in counts) / attempts) if attempts else 0.0}


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


@dataclass
class _EvalInputs:
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


def _eval_inputs(
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
) -> _EvalInputs:
    """The split's examples (capped per task; rows whose image cannot be read dropped), their visual tokens and
    exemplars (training studies only), the first training row per study and the constant answers."""
    from generation.data.features import exemplars_for_rows, visual_tokens_for_rows
    from generation.training.train import split_rows

    rows = split_rows(df, split)
    train_rows = split_rows(df, "train")
    every = build_examples(df, tasks, rows, seed=seed)
    examples = _cap(every, max_per_task, seed)
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
    by_prompt, by_task = constant_answers(build_examples(df, tasks, train_rows, seed=seed))
    available = {t: len(exs) for t, exs in every.items()}
    return _EvalInputs(df, rows, examples, visual, bad, exemplars, study_rows, by_prompt, by_task, available)


def _baseline_answers(data: _EvalInputs, cond: str, task: str, exs: Sequence[Example]) -> list[str]:
    """The `constant` or `retrieval-only` answers."""
    if cond == "constant":
        return [data.by_prompt.get((task, e.prompt), data.by_task.get(task, DEFAULT_ANSWER[task])) for e in exs]
    return [retrieval_answer(data.df, data.study_rows, e, data.exemplars.get(e.row, [])) for e in exs]


def _vlm_outputs(gen: Any, data: _EvalInputs, task: str, exs: Sequence[Example], k: int) -> list[dict]:
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
    vqa_source: str = "head",
    report_source: str = "findings",
    box_source: str = "head",
    finding_source: str = "ridge",
    classify_source: str = "head",
    image_control: str = "real",
    shuffled: bool = False,
) -> dict:
    """Metrics per task and condition (constant, retrieval-only, VLM k=0, VLM k=K for each K in `k`; with
    `shuffled`, the last VLM condition's answers shuffled between the test images); the `*_source` options are the
    `Generator`'s. `image_control` (`image_controls.py`): `blank`, `noise` or `other` replace every test image."""
    from generation.writing.generate import Generator
    from retrieval.data.manifest import read_manifest

    t0 = time.time()
    df = manifest if isinstance(manifest, pd.DataFrame) else read_manifest(manifest)
    ks = sorted({int(x) for x in ([k] if isinstance(k, int) else k) if int(x) > 0})
    gen = Generator(
        vlm_dir,
        index_dir,
        retrieval_model=retrieval_model,
        decoding=decoding,
        constrain_boxes=constrain_boxes,
        vqa_source=vqa_source,
        report_source=report_source,
        box_source=box_source,
        finding_source=finding_source,
        classify_source=classify_source,
    )
    tasks = [t for t in (tasks or gen.vlm.config.tasks or TASKS)]
    data = _eval_inputs(
        gen, df, tasks, split, ks, max_per_task, seed, progress, retrieval_model, retrieval_target, token_cache
    )
    if image_control != "real":
        from generation.data.image_controls import apply_image_control
        from generation.training.train import split_rows

        train = {str(s) for s in df.iloc[split_rows(df, "train")]["study_id"]}
        kmax = max([*ks, 1])
        data.visual, data.exemplars = apply_image_control(
            gen, data.visual, data.exemplars, df, image_control, kmax, train, seed
        )
    conditions = ["constant"] + (["retrieval-only"] if data.exemplars else []) + ["vlm k=0"]
    if data.exemplars and gen.vlm.config.rag_k:
        conditions += [f"vlm k={kk}" for kk in ks]
    conditions += ["shuffled"] if shuffled else []

    results: dict[str, dict] = {}
    samples: dict[str, list] = {}
    rag: dict[str, dict] = {}
    seconds: dict[str, float] = {}
    for task, exs in data.examples.items():
        results[task] = {}
        answers: list = []
        boxes = detections = None
        for cond in conditions:
            if cond == "shuffled":  # the last VLM condition's answers, each given to another test image
                from generation.data.image_controls import derangement

                order = derangement(len(exs), np.random.default_rng(seed))
                answers = [answers[i] for i in order]
                boxes = None if boxes is None else [boxes[i] for i in order]
                detections = None if detections is None else [detections[i] for i in order]
            elif not cond.startswith("vlm"):
                answers, boxes, detections = _baseline_answers(data, cond, task, exs), None, None
            else:
                kk = int(cond.split("=")[1])
                t1 = time.time()
                outs = _vlm_outputs(gen, data, task, exs, kk)
                seconds[f"{task}/{cond}"] = round(time.time() - t1, 2)
                answers, boxes = [o["text"] for o in outs], [o.get("boxes") for o in outs]
                detections = [o.get("detections") for o in outs]
                if task == "report" and kk > 0:
                    rag[f"k={kk}"] = {
                        **rag_diagnostics(df, data.study_rows, exs, data.exemplars, kk),
                        "output_sentences_copied": copy_rate(outs),
                    }
                samples.setdefault(task, []).extend(_samples(df, cond, exs, outs))
            results[task][cond] = {"n": len(exs), **score_task(task, exs, answers, meteor, boxes, detections)}
    return {
        "vlm": str(vlm_dir),
        "index": str(index_dir) if index_dir else None,
        "split": split,
        "k": ks,
        "retrieval_target": retrieval_target,
        "image_control": image_control,
        "rag": rag,
        "generation_seconds": seconds,
        "seconds_per_output": {
            c: round(v / max(1, len(data.examples[c.split("/")[0]])), 4) for c, v in seconds.items()
        },
        "rows": len(data.rows),
        "examples_available": data.available,  # n in a table is a seeded sample of these when it is smaller
        "bad_rows": data.bad,
        "tasks": results,
        "samples": samples,
        "seconds": round(time.time() - t0, 1),
    }


def _is_abnormal_row(df: pd.DataFrame, pos: int) -> bool:
    return is_abnormal(df.iloc[pos]["labels"])


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return "nan" if v != v else f"{v:.3f}"
    return str(v)


def len_sampled(res: dict, task: str) -> tuple[int, int]:
    """(examples scored, examples the split has) for `task`; equal when nothing was sampled."""
    n = max((int(m.get("n", 0)) for m in res["tasks"][task].values()), default=0)
    return n, max(n, int(res.get("examples_available", {}).get(task, n)))


def results_markdown(res: dict) -> str:
    """One markdown table per task: conditions as rows, metrics as columns."""
    lines = []
    for task, conds in res["tasks"].items():
        cols = [c for c in next(iter(conds.values())) if c != "gt_boxes"]
        n, of = len_sampled(res, task)
        sampled = f" (n = {n}: a seeded sample of the split's {of}; --max-per-task 0 takes all)" if n < of else ""
        lines += [
            f"### [{task}]{sampled}",
            "",
            "| condition | " + " | ".join(cols) + " |",
            "|---" * (len(cols) + 1) + "|",
        ]
        for cond, m in conds.items():
            lines.append(f"| {cond} | " + " | ".join(_fmt(m.get(c)) for c in cols) + " |")
        lines.append("")
    if res.get("rag"):
        cols = list(next(iter(res["rag"].values())))
        lines += ["### RAG: are the exemplars informative, does the output copy them?", ""]
        lines += ["| k | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
        for kk, m in res["rag"].items():
            lines.append(f"| {kk} | " + " | ".join(_fmt(m.get(c)) for c in cols) + " |")
        lines.append("")
    return "\n".join(lines)
