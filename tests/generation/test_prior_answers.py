"""The image-free training prior: each answer against a count made by hand over a small training split."""

from __future__ import annotations

import pytest

from generation.data.tasks import Example
from generation.evaluation.prior_answers import fit_prior, prior_groups


def _box(label, x1, x2, y1=0.2, y2=0.6):
    return {"label": label, "x1": x1, "y1": y1, "x2": x2, "y2": y2}


TRAIN_BOXES = [
    [_box("Lung Lesion", 0.1, 0.3), _box("Lung Lesion", 0.6, 0.8)],
    [_box("Lung Lesion", 0.2, 0.4)],
    [_box("Lung Lesion", 0.7, 0.9), _box("Pleural Effusion", 0.6, 0.7)],
    [],
]


def test_prior_groups_are_mean_boxes_per_label_and_half_scored_by_prevalence():
    groups = prior_groups(TRAIN_BOXES)
    by_key = {(g["label"], g["x1"] < 0.5): g for g in groups}
    assert set(by_key) == {("Lung Lesion", True), ("Lung Lesion", False), ("Pleural Effusion", False)}
    assert by_key[("Lung Lesion", True)]["score"] == 0.5 and by_key[("Lung Lesion", True)]["x1"] == pytest.approx(0.15)
    assert by_key[("Lung Lesion", False)]["score"] == 0.5 and by_key[("Lung Lesion", False)]["x2"] == pytest.approx(
        0.85
    )
    assert by_key[("Pleural Effusion", False)]["score"] == 0.25
    assert [g["score"] for g in groups] == sorted((g["score"] for g in groups), reverse=True)


def test_prior_answers_identify_classify_and_closed_vqa_by_prevalence():
    ident = [Example("identify", "find", "", i, {"boxes": bs}) for i, bs in enumerate(TRAIN_BOXES)]
    labels = [["Lung Lesion"], ["Lung Lesion"], ["Lung Lesion", "Pleural Effusion"], ["No Finding"]]
    prior = fit_prior({"identify": ident}, labels)
    text, boxes, dets = prior.answer(Example("identify", "find", "", 9), "no findings")
    # groups per image 2, 1, 2, 0: mean 1.25 -> one box, the most prevalent group; every group a detection
    assert len(boxes) == 1 and boxes[0]["label"] == "Lung Lesion" and len(dets) == 3 and "Lung Lesion" in text
    assert prior.answer(Example("classify", "c", "", 9), "No Finding")[0] == "Lung Lesion"  # 3 of 4 >= 0.5
    assert prior.answer(Example("vqa", "is there lung lesion?", "", 9), "yes")[0] == "yes"
    assert prior.answer(Example("vqa", "is there pleural effusion?", "", 9), "yes")[0] == "no"  # 1 of 4
    assert prior.answer(Example("report", "r", "", 9), "the constant")[0] == "the constant"
    rare = fit_prior({}, [["Pleural Effusion"], ["No Finding"], ["Cardiomegaly"], ["Lung Lesion"], ["Lung Lesion"]])
    assert rare.answer(Example("classify", "c", "", 9), "x")[0] == "Lung Lesion"  # none >= 0.5: the most prevalent
