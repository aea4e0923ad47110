"""Manifest rows -> (task, prompt, target) examples for the five tasks.

- `[report]`: findings + impression (or the whole report when the sections are empty).
- `[vqa]`: closed yes/no questions from the labels ("is there cardiomegaly?"), open "what abnormality is
  seen?", and "where is the X?" answered with boxes.
- `[classify]`: the positive labels in `LABELS` order, or `No Finding`.
- `[identify]`: finding boxes (same-label IoU > 0.5 merged) as `Label {<x1><y1><x2><y2>}; ...` (seed 001).
- `[ground]`: an anatomy or finding phrase -> its box(es) (seed 003).
Anatomy boxes are those labelled `anatomy:<name>` (the demo corpus) or with a known anatomy name (`Right Lung`,
as the covid-cxr lung boxes come); every other box is a finding (its label may be finer than `LABELS`, e.g.
`Calcified Granuloma` or `Active Tuberculosis`).
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import pandas as pd

from generation.data.boxes import format_box, format_findings, merge_boxes
from generation.model.tokenizer import TASKS
from retrieval.labels import ANATOMY, ANATOMY_PREFIX, LABELS, NO_FINDING
from retrieval.study_text import sections_text

PROMPTS: dict[str, str] = {
    "report": "describe the findings and impression.",
    "classify": "which diagnoses are present?",
    "identify": "describe the findings with their boxes.",
}
OPEN_QUESTION = "what abnormality is seen?"
NO_ABNORMALITY = "none"


@dataclass
class Example:
    """One training/evaluation example: `row` is the manifest position (image, study, patient, exemplars)."""

    task: str
    prompt: str
    target: str
    row: int
    info: dict[str, Any] = field(default_factory=dict)


def _list(value: Any) -> list:
    if value is None or (isinstance(value, float) and value != value):
        return []
    return list(value)


def report_target(row: Any) -> str:
    """Findings + impression, or the report when both sections are empty."""
    return sections_text(row)


ANATOMY_NAMES = frozenset(n.lower() for n in (*ANATOMY, "Lungs"))  # "Lungs": a box over both lungs (covid-cxr)


def is_anatomy(label: str) -> bool:
    """True for anatomy boxes: an `anatomy:` prefix or a known anatomy name."""
    label = str(label)
    return label.startswith(ANATOMY_PREFIX) or label.lower() in ANATOMY_NAMES


def box_name(label: str) -> str:
    """The box's name as text: anatomy without its prefix."""
    return str(label).removeprefix(ANATOMY_PREFIX)


def finding_boxes(boxes: Iterable[dict]) -> list[dict]:
    """Finding boxes (every box that is not anatomy)."""
    return [b for b in boxes if not is_anatomy(b.get("label", ""))]


def anatomy_boxes(boxes: Iterable[dict]) -> list[dict]:
    """Anatomy boxes, labels without the `anatomy:` prefix."""
    return [{**b, "label": box_name(b["label"])} for b in boxes if is_anatomy(b.get("label", ""))]


def classify_target(labels: Sequence[str]) -> str:
    """Positive labels in LABELS order, comma-separated; `No Finding` when none."""
    pos = [lab for lab in LABELS if lab in set(labels) and lab != NO_FINDING]
    return ", ".join(pos) if pos else NO_FINDING


def _boxes_by_label(boxes: Sequence[dict]) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for b in merge_boxes(boxes):
        out.setdefault(b["label"], []).append(b)
    return out


def row_examples(
    row: Any, pos: int, tasks: Sequence[str] = TASKS, label_vocab: Sequence[str] = LABELS, seed: int = 0
) -> list[Example]:
    """All examples one manifest row yields for `tasks`; `label_vocab` limits closed VQA negatives."""
    labels = [lab for lab in _list(row.get("labels")) if lab]
    boxes = [b for b in _list(row.get("boxes")) if isinstance(b, dict)]
    positives = [lab for lab in labels if lab != NO_FINDING and lab in LABELS]
    fboxes, aboxes = finding_boxes(boxes), anatomy_boxes(boxes)
    rng = random.Random(f"{seed}:{pos}")
    out: list[Example] = []
    if "report" in tasks and (target := report_target(row)):
        out.append(Example("report", PROMPTS["report"], target, pos))
    if "classify" in tasks and labels:
        out.append(Example("classify", PROMPTS["classify"], classify_target(labels), pos))
    if "vqa" in tasks and labels:
        for lab in positives:
            out.append(Example("vqa", f"is there {lab.lower()}?", "yes", pos, {"kind": "closed"}))
        negatives = [lab for lab in label_vocab if lab not in labels and lab != NO_FINDING]
        for lab in rng.sample(negatives, min(len(negatives), max(1, len(positives)))):
            out.append(Example("vqa", f"is there {lab.lower()}?", "no", pos, {"kind": "closed"}))
        answer = ", ".join(lab.lower() for lab in LABELS if lab in positives) or NO_ABNORMALITY
        out.append(Example("vqa", OPEN_QUESTION, answer, pos, {"kind": "open"}))
        for lab, group in _boxes_by_label(fboxes).items():
            out.append(
                Example(
                    "vqa",
                    f"where is the {lab.lower()}?",
                    " ".join(format_box(b) for b in group),
                    pos,
                    {"kind": "where", "boxes": group},
                )
            )
    # [identify] needs to know every finding's place: rows with finding boxes, or normal rows (no findings).
    if "identify" in tasks and (fboxes or (labels and not positives)):
        merged = merge_boxes(fboxes)
        out.append(Example("identify", PROMPTS["identify"], format_findings(merged), pos, {"boxes": merged}))
    if "ground" in tasks:
        for lab, group in _boxes_by_label(aboxes + fboxes).items():
            out.append(
                Example(
                    "ground",
                    lab.lower(),
                    " ".join(format_box(b) for b in group),
                    pos,
                    {"phrase": lab, "boxes": group},
                )
            )
    return out


def build_examples(
    df: pd.DataFrame, tasks: Sequence[str] = TASKS, rows: Sequence[int] | None = None, seed: int = 0
) -> dict[str, list[Example]]:
    """Examples per task for the manifest rows at positions `rows` (default: all); empty tasks are dropped."""
    unknown = set(tasks) - set(TASKS)
    if unknown:
        raise ValueError(f"unknown task(s) {sorted(unknown)}; choose from {list(TASKS)}")
    present = {lab for labs in df["labels"] if isinstance(labs, list | tuple) for lab in labs}
    vocab = [lab for lab in LABELS if lab in present] or list(LABELS)
    rows = range(len(df)) if rows is None else rows
    out: dict[str, list[Example]] = {t: [] for t in tasks}
    records = df.to_dict("records")
    for pos in rows:
        for ex in row_examples(records[pos], pos, tasks, vocab, seed):
            out[ex.task].append(ex)
    return {t: exs for t, exs in out.items() if exs}
