"""Manifest rows -> (task, prompt, target) examples."""

from __future__ import annotations

import pandas as pd
import pytest

from generation.data.boxes import parse_boxes
from generation.data.tasks import build_examples, classify_target, row_examples

ROW = {
    "findings": "The heart is enlarged.",
    "impression": "Cardiomegaly. Small effusion.",
    "report": "ignored when sections exist",
    "labels": ["Pleural Effusion", "Cardiomegaly"],
    "boxes": [
        {"label": "Cardiomegaly", "x1": 0.3, "y1": 0.4, "x2": 0.7, "y2": 0.8},
        {"label": "Cardiomegaly", "x1": 0.31, "y1": 0.4, "x2": 0.7, "y2": 0.8},  # duplicate, merged
        {"label": "Pleural Effusion", "x1": 0.05, "y1": 0.6, "x2": 0.3, "y2": 0.9},
        {"label": "Right Lung", "x1": 0.05, "y1": 0.1, "x2": 0.45, "y2": 0.9},
    ],
}


def by_task(exs):
    out = {}
    for e in exs:
        out.setdefault(e.task, []).append(e)
    return out


def test_all_five_tasks_from_one_row():
    t = by_task(row_examples(ROW, 7))
    assert set(t) == {"report", "vqa", "classify", "identify", "ground"}
    assert all(e.row == 7 for es in t.values() for e in es)
    assert t["report"][0].target == "The heart is enlarged. Cardiomegaly. Small effusion."
    # LABELS order, not the row's order
    assert t["classify"][0].target == "Cardiomegaly, Pleural Effusion"
    ident = t["identify"][0]
    assert ident.target == "Cardiomegaly {<30><40><70><80>}; Pleural Effusion {<5><60><30><90>}"
    assert len(ident.info["boxes"]) == 2
    phrases = {e.prompt: e.target for e in t["ground"]}
    assert phrases["right lung"] == "{<5><10><45><90>}"
    assert phrases["cardiomegaly"] == "{<30><40><70><80>}"


def test_vqa_questions():
    vqa = by_task(row_examples(ROW, 0))["vqa"]
    closed = {e.prompt: e.target for e in vqa if e.info["kind"] == "closed"}
    assert closed["is there cardiomegaly?"] == "yes" and closed["is there pleural effusion?"] == "yes"
    assert list(closed.values()).count("no") == 2  # as many negatives as positives
    open_ = [e for e in vqa if e.info["kind"] == "open"][0]
    assert open_.target == "cardiomegaly, pleural effusion"
    where = {e.prompt: e.target for e in vqa if e.info["kind"] == "where"}
    assert parse_boxes(where["where is the pleural effusion?"])[0]["x1"] == pytest.approx(0.05)


def test_normal_row_and_missing_data():
    normal = by_task(row_examples({"labels": ["No Finding"], "boxes": [], "report": "Normal chest."}, 1))
    assert normal["classify"][0].target == "No Finding"
    assert normal["identify"][0].target == "no findings"
    assert "ground" not in normal
    assert [e.target for e in normal["vqa"] if e.info["kind"] == "open"] == ["none"]
    # abnormal without finding boxes: no [identify] (the places are unknown); no text: no [report]
    t = by_task(row_examples({"labels": ["Edema"], "boxes": [], "report": ""}, 2))
    assert "identify" not in t and "report" not in t
    assert classify_target([]) == "No Finding"


def test_build_examples_limits_negatives_to_present_labels():
    df = pd.DataFrame(
        [
            {**ROW, "labels": ["Cardiomegaly"]},
            {**ROW, "labels": ["Edema"], "boxes": []},
            {**ROW, "labels": ["No Finding"], "boxes": []},
        ]
    )
    ex = build_examples(df, ["vqa", "classify"])
    assert set(ex) == {"vqa", "classify"} and len(ex["classify"]) == 3
    asked = {e.prompt for e in ex["vqa"] if e.info["kind"] == "closed"}
    assert asked <= {"is there cardiomegaly?", "is there edema?"}
    with pytest.raises(ValueError):
        build_examples(df, ["caption"])


def test_anatomy_prefix_and_fine_finding_names():
    row = {
        "labels": ["No Finding"],
        "report": "Normal. Calcified granuloma.",
        "boxes": [
            {"label": "Calcified Granuloma", "x1": 0.2, "y1": 0.2, "x2": 0.3, "y2": 0.3},
            {"label": "anatomy:Heart", "x1": 0.4, "y1": 0.5, "x2": 0.7, "y2": 0.8},
        ],
    }
    t = by_task(row_examples(row, 0))
    assert t["identify"][0].target == "Calcified Granuloma {<20><20><30><30>}"
    assert {e.prompt for e in t["ground"]} == {"heart", "calcified granuloma"}
    assert [e.prompt for e in t["vqa"] if e.info["kind"] == "where"] == ["where is the calcified granuloma?"]


def test_constant_baseline_most_common_answer_and_mean_box():
    from generation.evaluation.baselines import constant_answers

    rows = [
        {"labels": ["Edema"], "boxes": [{"label": "anatomy:Heart", "x1": 0.2, "y1": 0.4, "x2": 0.6, "y2": 0.8}]},
        {"labels": ["Edema"], "boxes": [{"label": "anatomy:Heart", "x1": 0.4, "y1": 0.6, "x2": 0.8, "y2": 1.0}]},
        {"labels": ["No Finding"], "boxes": []},
    ]
    ex = build_examples(pd.DataFrame(rows), ["classify", "ground"])
    by_prompt, by_task = constant_answers(ex)
    assert by_prompt[("classify", "which diagnoses are present?")] == "Edema"
    assert by_prompt[("ground", "heart")] == "{<30><50><70><90>}"
    assert by_task["classify"] == "Edema"


def test_evaluation_sample_of_a_task_does_not_depend_on_the_other_tasks():
    from generation.data.tasks import Example
    from generation.evaluation.eval_inputs import cap_examples

    exs = {t: [Example(t, "p", str(i), i) for i in range(50)] for t in ("report", "vqa", "ground")}
    alone = cap_examples({"vqa": exs["vqa"]}, 10, 0)["vqa"]
    together = cap_examples(exs, 10, 0)["vqa"]
    assert [e.row for e in alone] == [e.row for e in together] and len(alone) == 10
    assert [e.row for e in cap_examples(exs, 10, 1)["vqa"]] != [e.row for e in together]
