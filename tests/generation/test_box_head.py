"""The ridge box head: its dual (kernel) solution equals the naive primal ridge, it recovers boxes that the
features determine, its presence thresholds match prevalence, and it survives save/load."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from generation.data.boxes import parse_boxes
from generation.heads.box_head import BoxHead, box_features, fit_box_head


def _data(n: int = 120, d: int = 40, seed: int = 0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, d)).astype(np.float32)
    cx = 0.5 + 0.1 * np.tanh(x[:, 0])
    rows = []
    for i in range(n):
        boxes = [{"label": "Right Lung", "x1": cx[i] - 0.3, "y1": 0.2, "x2": cx[i], "y2": 0.8}]
        if x[i, 1] > 0.3:  # the finding shows in feature 1; its place follows feature 2
            y = 0.4 + 0.1 * np.tanh(x[i, 2])
            boxes.append({"label": "Nodule", "x1": 0.6, "y1": y, "x2": 0.7, "y2": y + 0.1})
        rows.append(boxes)
    return x, rows


def _naive_primal(x: np.ndarray, y: np.ndarray, lam: float) -> tuple[np.ndarray, np.ndarray]:
    """Ridge with an unpenalised intercept, solved in feature space; the penalty scaled as the head scales it."""
    xm, ym = x.mean(0), y.mean(0)
    xc = x - xm
    reg = lam * np.trace(xc @ xc.T) / len(x)
    w = np.linalg.solve(xc.T @ xc + reg * np.eye(x.shape[1]), xc.T @ (y - ym))
    return w, ym - xm @ w


def test_dual_solution_equals_the_naive_primal_ridge():
    x, rows = _data()
    head = fit_box_head(x, rows, {"right lung"}, lam=0.1, min_rows=5)
    for name in ("Right Lung", "Nodule"):
        sel = [i for i, r in enumerate(rows) if any(b["label"] == name for b in r)]
        y = np.array([[b[k] for k in ("x1", "y1", "x2", "y2")] for i in sel for b in rows[i] if b["label"] == name])
        w, b = _naive_primal(x[sel].astype(np.float64), y, 0.1)
        want = np.clip(x.astype(np.float64) @ w + b, 0, 1)
        got = head.boxes(x)[:, head.groups(name)[0]]
        np.testing.assert_allclose(got, want, atol=1e-5)


def test_recovers_boxes_better_than_the_mean_box_on_held_out_rows():
    x, rows = _data(n=300)
    head = fit_box_head(x[:200], rows[:200], {"right lung"}, lam=0.01)
    truth = np.array([[r[0][k] for k in ("x1", "y1", "x2", "y2")] for r in rows[200:]])
    got = head.boxes(x[200:])[:, head.groups("right lung")[0]]  # names match case-insensitively
    mean = truth.mean(0)
    assert np.abs(got - truth).mean() < 0.3 * np.abs(mean - truth).mean()


def test_presence_is_predicted_as_often_as_it_occurs_and_identify_text_parses():
    x, rows = _data(n=200)
    head = fit_box_head(x, rows, {"right lung"})
    j = head.groups("nodule")[0]
    scores = head.presence_scores(x)
    assert np.isneginf(scores[:, head.groups("right lung")[0]]).all()  # anatomy is never "identified"
    has = np.array([any(b["label"] == "Nodule" for b in r) for r in rows])
    assert (scores[:, j] > head.thresholds[j]).sum() == has.sum()
    texts = head.answer_identify(x[:20])
    for t, h in zip(texts, has[:20], strict=True):
        boxes = parse_boxes(t)
        assert (t == "no findings") == (not boxes)
        assert all(b["label"].lower() == "nodule" and b["x1"] < b["x2"] and b["y1"] < b["y2"] for b in boxes)
    assert np.mean([("nodule" in t.lower()) == h for t, h in zip(texts, has[:20], strict=True)]) >= 0.8


def test_unknown_phrase_and_too_few_rows_are_left_to_the_lm(tmp_path):
    x, rows = _data(n=60)
    head = fit_box_head(x, rows, {"right lung"}, min_rows=1000)
    assert head is None
    head = fit_box_head(x, rows, {"right lung"})
    assert head.answer_ground(x[:2], ["heart", "right lung"])[0] is None
    assert head.answer_ground(x[:2], ["heart", "right lung"])[1].startswith("{")
    head.save(tmp_path)
    again = BoxHead.load(tmp_path)
    assert again.names == head.names and again.anatomy == head.anatomy and again.sides == head.sides
    np.testing.assert_allclose(again.boxes(x), head.boxes(x), atol=1e-4)
    assert BoxHead.load(tmp_path / "none") is None


def test_box_features_average_pool_a_square_grid():
    t = torch.arange(2 * 36 * 3, dtype=torch.float32).reshape(2, 36, 3)
    f = box_features(t)
    grid = t.reshape(2, 6, 6, 3)
    block = grid[:, 0:2, 2:4, :].mean(dim=(1, 2))  # pooled cell (row 0, col 1)
    assert f.shape == (2, 27)
    np.testing.assert_allclose(f.reshape(2, 3, 3, 3)[:, :, 0, 1], block.numpy())  # (B, d, 3, 3) flattened
    with pytest.raises(ValueError):
        box_features(torch.zeros(1, 10, 3))


def _sided(n: int = 300, seed: int = 1):
    """A lesion in the left or the right half (feature 0 says which, feature 1 moves it up/down), sometimes both."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 30)).astype(np.float32)
    rows = []
    for i in range(n):
        y = 0.3 + 0.05 * np.tanh(x[i, 1])
        left = {"label": "Lesion", "x1": 0.15, "y1": y, "x2": 0.3, "y2": y + 0.15}
        right = {"label": "Lesion", "x1": 0.7, "y1": y, "x2": 0.85, "y2": y + 0.15}
        rows.append([left] if x[i, 0] < -0.3 else [right] if x[i, 0] > 0.3 else [left, right])
    return x, rows


def test_a_lesion_left_or_right_gets_a_box_per_half_not_one_between():
    from generation.data.boxes import iou
    from generation.evaluation.metrics import localisation_accuracy, map50

    x, rows = _sided()
    head = fit_box_head(x[:200], rows[:200], set())
    assert sorted(head.sides[g] for g in head.groups("lesion")) == ["left", "right"]
    preds = head.identify(x[200:])
    for p in preds:  # valid boxes with a score, most confident first, none across the midline
        assert all(b["x1"] < b["x2"] and b["y1"] < b["y2"] and not b["x1"] < 0.5 < b["x2"] for b in p)
        assert [b["score"] for b in p] == sorted((b["score"] for b in p), reverse=True)
    assert localisation_accuracy(rows[200:], preds)["acc@0.5"] > 0.9
    assert map50(rows[200:], preds) > 0.8
    # the naive reference: one box per name from the same features lands between the halves
    mean = np.mean([[b[k] for k in ("x1", "y1", "x2", "y2")] for r in rows[:200] for b in r], axis=0)
    one = dict(zip(("x1", "y1", "x2", "y2"), mean, strict=True))
    assert np.mean([max(iou(one, b) for b in r) for r in rows[200:]]) < 0.3
    ground = head.ground(x[200:], ["lesion"])
    assert all(g is not None and len(g) >= 1 for g in ground)


def test_map50_ranks_by_score_when_given():
    from generation.evaluation.metrics import map50

    truth = [
        [{"label": "A", "x1": 0.1, "y1": 0.1, "x2": 0.3, "y2": 0.3}],
        [{"label": "A", "x1": 0.5, "y1": 0.5, "x2": 0.7, "y2": 0.7}],
    ]
    hit = {"label": "A", "x1": 0.1, "y1": 0.1, "x2": 0.3, "y2": 0.3}
    miss = {"label": "A", "x1": 0.8, "y1": 0.8, "x2": 0.9, "y2": 0.9}
    good = [[{**hit, "score": 0.9}], [{**miss, "score": 0.1}]]
    bad = [[{**hit, "score": 0.1}], [{**miss, "score": 0.9}]]
    assert map50(truth, good) > map50(truth, bad)


def test_detections_list_every_finding_group_scored_and_hold_the_answer():
    """`detections` is the ranked candidate list mAP reads: every finding group (anatomy never), most confident
    first, and the thresholded `[identify]` answer is part of it, box for box."""
    x, rows = _sided()
    head = fit_box_head(x[:200], rows[:200], set())
    answers, dets = head.identify(x[200:]), head.detections(x[200:])
    assert len(dets) == len(answers) == len(x) - 200
    for a, d in zip(answers, dets, strict=True):
        assert 1 <= len(d) <= 2 and all(b["label"] == "Lesion" for b in d)
        assert [b["score"] for b in d] == sorted((b["score"] for b in d), reverse=True)
        assert all(b in d for b in a)
    assert sum(map(len, dets)) > sum(map(len, answers))  # below-threshold halves are kept as candidates
    xr, rows_r = _data()
    head_r = fit_box_head(xr, rows_r, {"right lung"}, min_rows=5)
    assert all(b["label"] == "Nodule" for d in head_r.detections(xr) for b in d)


def test_identify_scores_map_over_the_detections_and_over_the_answer():
    """score_task's `map@0.5` ranks the detections when given (the answer's boxes otherwise); `map@0.5_answer`
    ranks the answer alone; Acc@IoU reads the answer."""
    from generation.data.tasks import Example
    from generation.evaluation.metrics import map50
    from generation.evaluation.task_scores import score_task

    x, rows = _sided()
    head = fit_box_head(x[:200], rows[:200], set())
    exs = [Example(row=i, task="identify", prompt="", target="", info={"boxes": r}) for i, r in enumerate(rows[200:])]
    answers, dets = head.identify(x[200:]), head.detections(x[200:])
    texts = head.answer_identify(x[200:])
    scored = score_task("identify", exs, texts, boxes=answers, detections=dets)
    assert scored["map@0.5"] == pytest.approx(map50(rows[200:], dets))
    assert scored["map@0.5_answer"] == pytest.approx(map50(rows[200:], answers))
    plain = score_task("identify", exs, texts, boxes=answers)
    assert plain["map@0.5"] == plain["map@0.5_answer"] and plain["acc@0.3"] == scored["acc@0.3"]
