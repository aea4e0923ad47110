"""Generation metrics: library scores on known cases, localisation against a naive loop, mAP sanity."""

from __future__ import annotations

import numpy as np
import pytest

from generation.evaluation.metrics import (
    clinical_efficacy,
    grounding_iou,
    localisation_accuracy,
    map50,
    multilabel_prf,
    parse_label_list,
    text_metrics,
    vqa_accuracy,
)


def box(label, x1, y1, x2, y2):
    return {"label": label, "x1": x1, "y1": y1, "x2": x2, "y2": y2}


def test_text_metrics_identical_and_different():
    refs = ["the heart is normal in size .", "there is a small right pleural effusion ."]
    same = text_metrics(refs, refs, meteor=False)
    assert same["bleu4"] == pytest.approx(1.0, abs=1e-6) and same["rougeL"] == pytest.approx(1.0)
    assert same["sacrebleu"] == pytest.approx(100.0)
    other = text_metrics(refs, ["lungs are clear .", "no acute disease ."], meteor=False)
    assert other["bleu1"] < 0.5 and other["cider"] < same["cider"] and other["rougeL"] < 0.5


def test_multilabel_prf_against_hand_count():
    true = [["Edema"], ["Cardiomegaly", "Edema"], ["No Finding"]]
    pred = [["Edema"], ["Edema", "Fracture"], ["Cardiomegaly"]]
    m = multilabel_prf(true, pred)
    # tp = 2 (edema x2), fp = 2 (fracture, cardiomegaly), fn = 2 (cardiomegaly, no finding)
    assert m["micro_precision"] == pytest.approx(0.5) and m["micro_recall"] == pytest.approx(0.5)
    # labels present: No Finding, Cardiomegaly, Edema, Fracture -> F1 0, 0, 1, 0
    assert m["macro_f1"] == pytest.approx(0.25)


def test_clinical_efficacy_uses_labeler():
    ce = clinical_efficacy(["There is cardiomegaly."], ["The heart is enlarged, cardiomegaly."])
    assert ce["micro_f1"] == pytest.approx(1.0)
    ce = clinical_efficacy(["There is cardiomegaly."], ["No cardiomegaly."])
    assert ce["micro_f1"] == 0.0


def test_vqa_and_label_parsing():
    assert vqa_accuracy(
        ["yes", "no", "Cardiomegaly, edema"], ["yes ", "yes", "cardiomegaly ,  edema"]
    ) == pytest.approx(2 / 3)
    assert parse_label_list("cardiomegaly, pleural effusion, banana") == ["Cardiomegaly", "Pleural Effusion"]


def naive_acc(truth, preds, t):
    def iou(a, b):
        iw = max(0, min(a["x2"], b["x2"]) - max(a["x1"], b["x1"]))
        ih = max(0, min(a["y2"], b["y2"]) - max(a["y1"], b["y1"]))
        u = (a["x2"] - a["x1"]) * (a["y2"] - a["y1"]) + (b["x2"] - b["x1"]) * (b["y2"] - b["y1"]) - iw * ih
        return iw * ih / u if u > 0 else 0

    hits = n = 0
    for gt, pr in zip(truth, preds):
        for g in gt:
            n += 1
            hits += any(p["label"].lower() == g["label"].lower() and iou(g, p) > t for p in pr)
    return hits / n


def test_localisation_accuracy_matches_naive():
    rng = np.random.default_rng(0)

    def rand_box(label):
        x = np.sort(rng.uniform(0, 1, 2))
        y = np.sort(rng.uniform(0, 1, 2))
        return box(label, x[0], y[0], x[1], y[1])

    truth = [[rand_box(rng.choice(["A", "B"])) for _ in range(rng.integers(0, 3))] for _ in range(40)]
    preds = [[rand_box(rng.choice(["A", "B"])) for _ in range(rng.integers(0, 4))] for _ in range(40)]
    # make some predictions hits with noise
    for gt, pr in zip(truth, preds):
        for g in gt[:1]:
            pr.append({**g, "x1": g["x1"] + 0.01})
    got = localisation_accuracy(truth, preds)
    for t in (0.3, 0.4, 0.5):
        assert got[f"acc@{t}"] == pytest.approx(naive_acc(truth, preds, t))


def test_map50_perfect_partial_and_empty():
    truth = [[box("TB", 0.1, 0.1, 0.4, 0.4)], [box("TB", 0.5, 0.5, 0.9, 0.9)], []]
    assert map50(truth, truth) == pytest.approx(1.0)
    wrong_place = [[box("TB", 0.6, 0.6, 0.9, 0.9)], [box("TB", 0.5, 0.5, 0.9, 0.9)], []]
    # one of two found: AP 0.25 or 0.50 depending on how COCOeval orders the tied scores
    assert 0.2 < map50(truth, wrong_place) < 0.6
    assert map50(truth, [[], [], []]) == 0.0
    # a false positive named before the true box (so scored higher) lowers AP below 1
    fp = [[box("TB", 0.7, 0.7, 0.8, 0.8), box("TB", 0.1, 0.1, 0.4, 0.4)], [box("TB", 0.5, 0.5, 0.9, 0.9)], []]
    assert 0.5 < map50(truth, fp) < 0.9


def test_grounding_iou():
    gt = [[box("", 0.0, 0.0, 0.5, 0.5)], [box("", 0.5, 0.5, 1.0, 1.0)]]
    pr = [[box("", 0.0, 0.0, 0.5, 0.25)], []]
    g = grounding_iou(gt, pr)
    assert g["mean_iou"] == pytest.approx(0.25) and g["acc@0.5"] == 0.0 and g["gt_boxes"] == 2


def test_repeated_sentence_fraction():
    from generation.evaluation.metrics import repeated_sentence_fraction, repeats_a_sentence

    assert repeats_a_sentence("the lungs are clear. the lungs are clear. no acute abnormality.")
    assert repeats_a_sentence("Lungs are clear.  lungs are  clear")
    assert not repeats_a_sentence("the lungs are clear. the heart is normal.")
    assert repeated_sentence_fraction(["a. a.", "a. b.", "c.", "d. d. e."]) == pytest.approx(0.5)


def test_drafted_findings_names_only_what_the_labeler_reads():
    from retrieval.labels import label_report
    from serve.demo_pipeline import drafted_findings

    text = "The heart is enlarged. There is a large right pleural effusion."
    named = [x for x in label_report(text) if x != "No Finding"]
    out = drafted_findings(text, ["Pleural Effusion", "Atelectasis"])
    assert out["named"] == named and "Pleural Effusion" in named
    assert out["true"] == ["Pleural Effusion"]
    assert drafted_findings("the lungs are clear.", ["Pleural Effusion"])["true"] == []
