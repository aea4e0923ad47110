"""A report written from the finding head: the findings the image shows, in the exemplars' words where they have
them, and the exemplars' normal sentences for the rest.

The small LM's own drafts stay generic after a few hundred CPU steps, while the finding head (`head.py`) reads the
image well (`[classify]` macro-F1 0.44-0.48 against the constant's 0.09 on the demo,
benchmarks/results/generation_demo.md). `findings_report` turns the head's predictions into text:

1. the predicted findings (probability above the head's fitted threshold, most likely first);
2. for each, the first sentence of the head-ranked exemplars that the labeler reads as that finding and no
   finding the head did not predict, and that names no other side than the one the box head places the finding
   on (`finding_sides`); a plain template sentence (`FINDING_SENTENCES`) when no exemplar has one;
3. then the exemplars' sentences that name no positive finding and do not negate a predicted one ("no
   pneumothorax."), none repeating a chosen one in other words, up to `max_normal`; with nothing at all,
   `NORMAL_SENTENCE`.

Only sentences that lost no word to de-identification are quoted (`study_text.whole_sentences`). No sentence
appears twice. The report names exactly the findings the head predicts (the labeler reads back the
predicted set, which a test checks for every label), so its clinical efficacy follows the head's accuracy.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from generation.data.rag import Exemplar
from generation.heads.head import predicted_findings, rank_exemplars
from retrieval.labels import label_sentence
from retrieval.study_text import whole_sentences

# One sentence per finding that the labeler reads as exactly that finding (tests/test_gen_findings_report.py).
FINDING_SENTENCES: dict[str, str] = {
    "Enlarged Cardiomediastinum": "the mediastinum is widened.",
    "Cardiomegaly": "the heart is enlarged.",
    "Lung Opacity": "there is an airspace opacity.",
    "Lung Lesion": "there is a pulmonary nodule.",
    "Edema": "there is pulmonary edema.",
    "Consolidation": "there is focal consolidation.",
    "Pneumonia": "the findings are consistent with pneumonia.",
    "Atelectasis": "there is atelectasis.",
    "Pneumothorax": "there is a pneumothorax.",
    "Pleural Effusion": "there is a pleural effusion.",
    "Pleural Other": "there is pleural thickening.",
    "Fracture": "there is a rib fracture.",
    "Support Devices": "a support device is present.",
    "Tuberculosis": "the findings are consistent with tuberculosis.",
}
NORMAL_SENTENCE = "no acute cardiopulmonary abnormality."


@dataclass
class FindingsReport:
    text: str
    findings: list[str]  # the head's predicted findings, most likely first
    from_exemplars: int  # sentences taken from exemplars (the rest are templates)


def _similar(a: str, b: str, jaccard: float = 0.6) -> bool:
    """Same sentence, or one that says the same in other order ("heart size is normal" / "the heart is normal
    in size"): word-set Jaccard >= `jaccard`."""
    wa, wb = set(a.rstrip(".").split()), set(b.rstrip(".").split())
    return a == b or len(wa & wb) >= jaccard * max(1, len(wa | wb))


def _positives(status: dict[str, str]) -> set[str]:
    return {lab for lab, s in status.items() if s == "positive"}


def finding_sides(boxes: Sequence[dict]) -> dict[str, str]:
    """Finding label -> the patient's side (`right` / `left`) of its highest-scored box among `boxes` (the box
    head's scored detections), for boxes that lie in one image half. On a frontal radiograph the patient's right is
    the image's left half. A box's name maps to labels through the labeler ("nodule" -> Lung Lesion)."""
    sides: dict[str, str] = {}
    for b in sorted(boxes, key=lambda b: -float(b.get("score", 0.0))):
        if b["x1"] < 0.5 < b["x2"]:
            continue
        side = "right" if b["x2"] <= 0.5 else "left"
        for lab in _box_name_labels(str(b["label"]).lower()):
            sides.setdefault(lab, side)
    return sides


@functools.lru_cache(maxsize=512)
def _box_name_labels(name: str) -> frozenset[str]:
    """The labels the labeler reads in a box name ("nodule" -> Lung Lesion); a few dozen names, read once each."""
    return frozenset(_positives(label_sentence(f"there is {name}.")))


def _sides_named(sentence: str) -> set[str]:
    words = set(re.findall(r"\b(left|right|bilateral|bilaterally|both)\b", sentence))
    return {"left", "right"} if words & {"bilateral", "bilaterally", "both"} else words


def findings_report(
    probs: np.ndarray,
    thresholds: Sequence[float],
    exemplars: Sequence[Exemplar] = (),
    max_normal: int = 3,
    sides: Mapping[str, str] | None = None,
) -> FindingsReport:
    """The report for one image's head probabilities `probs` (L,) (see the module docstring); `sides`: finding
    label -> the patient's side it lies on (`finding_sides`), for the findings the box head places."""
    found = predicted_findings(probs, thresholds)
    ranked = rank_exemplars(exemplars, probs) if exemplars else []
    pool = [(s, label_sentence(s)) for e in ranked for s in whole_sentences(e.report) if s]
    sides = sides or {}

    def fits(lab: str, sentence: str, status: dict[str, str]) -> bool:
        named = _sides_named(sentence)
        return (
            lab in _positives(status)
            and _positives(status) <= set(found)
            and (lab not in sides or named <= {sides[lab]})
        )

    out: list[str] = []
    copied = 0
    for lab in found:
        pick = next((s for s, st in pool if fits(lab, s, st)), None)
        if pick is not None and pick not in out:
            out.append(pick)
            copied += 1
        elif FINDING_SENTENCES[lab] not in out:
            out.append(FINDING_SENTENCES[lab])
    normal: list[str] = []
    for s, st in pool:
        if _positives(st) or set(st) & set(found) or any(_similar(s, t) for t in out + normal):
            continue
        normal.append(s)
        if len(normal) == max_normal:
            break
    copied += len(normal)
    if not normal and not found:
        normal = [NORMAL_SENTENCE]
    return FindingsReport(" ".join(out + normal), found, copied)
