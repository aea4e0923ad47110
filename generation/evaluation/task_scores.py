"""The metrics of one task's answers against its examples' targets: text metrics and clinical efficacy for
`[report]`, P/R/F1 for `[classify]`, accuracy by question kind for `[vqa]`, Acc@IoU and COCO mAP@0.5 for
`[identify]`, IoU for `[ground]`; the share of malformed boxes beside each box task."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from generation.data.boxes import malformed_boxes, parse_boxes
from generation.data.tasks import Example
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
from retrieval.labels import LABELS


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

