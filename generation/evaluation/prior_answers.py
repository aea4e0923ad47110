"""The image-free training prior (issues 26 and 27): what the training split alone answers, for every test image
the same, as a baseline stronger than the constant where boxes and several findings are concerned.

- `[identify]`: per *(finding, image half)* group of the training boxes, the mean box, scored by the group's
  prevalence (the share of training images with a box of that group; `prior_groups`). Every group is a scored
  detection (mAP ranks them by prevalence); the answer lists the most prevalent groups, as many as a training
  image has on average (rounded, at least one when most training images have a finding box).
- `[classify]`: the findings present in at least half of the training images, else the most prevalent one.
- closed `[vqa]` ("is there X?"): "yes" when X is present in at least half of the training images.
- everything else (`[report]`, open `[vqa]`, `[ground]`'s mean box of the phrase) is the constant's answer
  (`baselines.constant_answers`): the most common training answer already is its prior.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from generation.data.boxes import boxes_text
from generation.data.tasks import Example, classify_target
from generation.heads.box_head import image_side
from generation.heads.head import closed_finding
from retrieval.labels import LABELS, NO_FINDING, multi_hot


def prior_groups(train_boxes: Sequence[Sequence[dict]]) -> list[dict]:
    """Per (label, image half) the mean training box, scored by its prevalence (share of training images with a
    box of that group), most prevalent first. `train_boxes`: each training image's finding boxes."""
    groups: dict[tuple[str, str], list[tuple[int, dict]]] = {}
    for r, bs in enumerate(train_boxes):
        for b in bs:
            groups.setdefault((str(b["label"]), image_side(b)), []).append((r, b))
    out = []
    for (label, _), items in groups.items():
        mean = {k: float(np.mean([b[k] for _, b in items])) for k in ("x1", "y1", "x2", "y2")}
        out.append({"label": label, **mean, "score": len({r for r, _ in items}) / max(1, len(train_boxes))})
    return sorted(out, key=lambda b: -b["score"])


@dataclass
class TrainingPrior:
    """The prior's answers, fitted on the training examples (`fit_prior`)."""

    groups: list[dict]  # prior_groups of the [identify] training examples
    answer_boxes: int  # how many of them the [identify] answer lists
    prevalence: dict[str, float]  # finding -> share of training images with it

    def answer(self, ex: Example, constant: str) -> tuple[str, list[dict] | None, list[dict] | None]:
        """(answer text, boxes, scored detections) for one test example; `constant`: the constant's answer."""
        if ex.task == "identify":
            boxes = self.groups[: self.answer_boxes]
            return boxes_text("identify", boxes), boxes, self.groups
        if ex.task == "classify":
            common = [lab for lab, p in self.prevalence.items() if p >= 0.5 and lab != NO_FINDING]
            if not common and self.prevalence:
                common = [max(self.prevalence, key=lambda lab: (self.prevalence[lab], lab))]
            return classify_target(common), None, None
        if ex.task == "vqa" and (j := closed_finding(ex.prompt)) is not None:
            return ("yes" if self.prevalence.get(LABELS[j], 0.0) >= 0.5 else "no"), None, None
        return constant, None, None


def fit_prior(train_examples: Mapping[str, Sequence[Example]], train_labels: Sequence[Sequence[str]]) -> TrainingPrior:
    """The prior from the training split's examples (`[identify]`'s boxes) and each training row's labels."""
    boxes = [list(e.info.get("boxes", [])) for e in train_examples.get("identify", [])]
    groups = prior_groups(boxes)
    per_image = [len({(b["label"], image_side(b)) for b in bs}) for bs in boxes]
    mean = float(np.mean(per_image)) if per_image else 0.0
    with_boxes = float(np.mean([n > 0 for n in per_image])) if per_image else 0.0
    count = max(int(round(mean)), 1 if with_boxes >= 0.5 else 0)
    share = multi_hot(train_labels).mean(axis=0) if len(train_labels) else np.zeros(len(LABELS))
    prevalence = {lab: float(p) for lab, p in zip(LABELS, share, strict=True) if p > 0}
    return TrainingPrior(groups, min(count, len(groups)), prevalence)
