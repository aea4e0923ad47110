"""Box text format/parse round trips, IoU and same-label merging against naive references."""

from __future__ import annotations

from hypothesis import assume, given, settings
from hypothesis import strategies as st

from generation.data.boxes import (
    format_box,
    format_findings,
    iou,
    merge_boxes,
    parse_boxes,
    snap,
    to_grid,
)
from generation.model.tokenizer import build_tokenizer, decode
from retrieval.labels import LABELS

coord = st.integers(0, 100)


@st.composite
def grid_boxes(draw, labels=LABELS[1:]):
    x = sorted([draw(coord), draw(coord)])
    y = sorted([draw(coord), draw(coord)])
    return {
        "label": draw(st.sampled_from(labels)),
        "x1": x[0] / 100,
        "y1": y[0] / 100,
        "x2": x[1] / 100,
        "y2": y[1] / 100,
    }


def naive_iou(a: dict, b: dict) -> float:
    iw = max(0.0, min(a["x2"], b["x2"]) - max(a["x1"], b["x1"]))
    ih = max(0.0, min(a["y2"], b["y2"]) - max(a["y1"], b["y1"]))
    inter = iw * ih
    area = lambda r: (r["x2"] - r["x1"]) * (r["y2"] - r["y1"])  # noqa: E731
    union = area(a) + area(b) - inter
    return inter / union if union > 0 else 0.0


def naive_merge(boxes: list[dict], thr: float = 0.5) -> list[dict]:
    """Largest first (earlier wins ties); drop a box overlapping an already kept same-label box above thr."""
    area = lambda r: (r["x2"] - r["x1"]) * (r["y2"] - r["y1"])  # noqa: E731
    order = sorted(range(len(boxes)), key=lambda i: (-area(boxes[i]), i))
    kept: list[int] = []
    for i in order:
        if all(boxes[j]["label"] != boxes[i]["label"] or naive_iou(boxes[i], boxes[j]) <= thr for j in kept):
            kept.append(i)
    return [boxes[i] for i in sorted(kept)]


def test_format_matches_litegpt_layout():
    box = {"label": "Cardiomegaly", "x1": 0.2, "y1": 0.45, "x2": 0.7, "y2": 0.8}
    assert format_box(box) == "{<20><45><70><80>}"
    assert format_findings([box]) == "Cardiomegaly {<20><45><70><80>}"
    assert format_findings([]) == "no findings"


def test_to_grid_clips_and_orders():
    assert to_grid({"x1": 0.9, "y1": -0.2, "x2": 0.1, "y2": 1.7}) == (10, 0, 90, 100)


@settings(max_examples=200, deadline=None)
@given(st.lists(grid_boxes(), max_size=5))
def test_round_trip_text(boxes):
    assert parse_boxes(format_findings(boxes), LABELS) == [snap(b) for b in boxes]


@settings(max_examples=60, deadline=None)
@given(st.lists(grid_boxes(), min_size=1, max_size=4))
def test_round_trip_through_tokenizer(boxes):
    """Decoded model text (lower-cased, spaced tokens) parses back to the same labelled boxes."""
    tok = _tok()
    text = format_findings(boxes)
    decoded = decode(tok, tok(text, add_special_tokens=False)["input_ids"])
    assert decoded != text  # the tokenizer really changes the surface form
    assert parse_boxes(decoded, LABELS) == [snap(b) for b in boxes]


_TOK = None


def _tok():
    global _TOK
    if _TOK is None:
        _TOK = build_tokenizer()
    return _TOK


def test_parse_skips_out_of_range_and_garbage():
    assert parse_boxes("Edema {<1><2><300><4>} and {<1><2>}") == []
    got = parse_boxes("text before; Edema {<1><2><3><4>} trailing")
    assert got == [{"label": "Edema", "x1": 0.01, "y1": 0.02, "x2": 0.03, "y2": 0.04}]


@settings(max_examples=200, deadline=None)
@given(grid_boxes(), grid_boxes())
def test_iou_matches_naive(a, b):
    assert abs(iou(a, b) - naive_iou(a, b)) < 1e-5


@settings(max_examples=300, deadline=None)
@given(st.lists(grid_boxes(labels=["Edema", "Fracture"]), max_size=8))
def test_merge_matches_naive(boxes):
    # a pair at IoU 0.5 exactly (to float error) is a tie that float32 NMS and float64 naive may call either way
    assume(all(abs(naive_iou(a, b) - 0.5) > 1e-6 for a in boxes for b in boxes if a["label"] == b["label"]))
    assert merge_boxes(boxes) == naive_merge(boxes)


def test_merge_keeps_other_labels_and_distant_boxes():
    a = {"label": "Edema", "x1": 0.1, "y1": 0.1, "x2": 0.5, "y2": 0.5}
    a2 = {"label": "Edema", "x1": 0.1, "y1": 0.1, "x2": 0.52, "y2": 0.52}  # larger, IoU 0.91 with a
    b = {"label": "Fracture", "x1": 0.1, "y1": 0.1, "x2": 0.5, "y2": 0.5}  # same place, other label
    c = {"label": "Edema", "x1": 0.6, "y1": 0.6, "x2": 0.9, "y2": 0.9}
    assert merge_boxes([a, a2, b, c]) == [a2, b, c]  # a2 is larger


def test_malformed_boxes_are_counted_and_never_parsed():
    from generation.data.boxes import malformed_boxes

    good = "Nodule {<10><20><30><40>}"
    assert malformed_boxes(good) == (1, 0)
    assert len(parse_boxes(good, LABELS)) == 1
    for bad in (
        "Nodule {<30><20><10><40>}",  # x1 > x2
        "Nodule {<10><40><30><40>}",  # y1 == y2
        "Nodule {<10><20><30>}",  # three coordinates
        "Nodule {<10><20><30><40>",  # never closed
        "Nodule {<10><20><30><40><50>}",  # five coordinates
    ):
        assert malformed_boxes(bad) == (1, 1), bad
        assert parse_boxes(bad, LABELS) == [], bad
    assert malformed_boxes(good + "; " + "Mass {<50><50><40><60>}") == (2, 1)


@settings(max_examples=100, deadline=None)
@given(grid_boxes())
def test_every_formatted_box_is_valid(box):
    from generation.data.boxes import malformed_boxes

    # even a box narrower than one grid unit formats as a valid box
    thin = {**box, "x2": box["x1"], "y2": box["y1"] + 0.001}
    assert malformed_boxes(format_box(thin)) == (1, 0)
