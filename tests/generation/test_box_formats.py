"""The pretrained VLMs' box formats (`generation/data/box_formats.py`): PaliGemma `<loc>` tokens and Qwen2.5-VL JSON,
both ways. Our box -> the model's text -> our box lands within one grid cell (1/1024 of the image for `<loc>`, one
pixel of the resized image for Qwen); malformed model output never crashes and yields no box."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from generation.data.box_formats import (
    LOC_BINS,
    box_format_for,
    format_boxes,
    format_loc,
    format_qwen,
    parse_loc,
    parse_model_boxes,
    parse_qwen,
)
from retrieval.labels import LABELS

SIZE = (476, 532)  # (w, h) of an image as Qwen2.5-VL's processor resized it (multiples of 28)


@st.composite
def boxes(draw):
    """A valid normalised box at least 1% wide and high, with a label from our vocabulary."""
    x1 = draw(st.floats(0, 0.98))
    y1 = draw(st.floats(0, 0.98))
    x2 = draw(st.floats(x1 + 0.01, 1.0))
    y2 = draw(st.floats(y1 + 0.01, 1.0))
    return {"label": draw(st.sampled_from(LABELS)), "x1": x1, "y1": y1, "x2": x2, "y2": y2}


def _close(a: dict, b: dict, cell_x: float, cell_y: float) -> bool:
    return (
        a["label"] == b["label"]
        and abs(a["x1"] - b["x1"]) <= cell_x
        and abs(a["x2"] - b["x2"]) <= cell_x
        and abs(a["y1"] - b["y1"]) <= cell_y
        and abs(a["y2"] - b["y2"]) <= cell_y
    )


@settings(max_examples=200, deadline=None)
@given(st.lists(boxes(), min_size=1, max_size=4))
def test_loc_round_trip_within_one_cell(bs):
    text = format_loc(bs)
    back = parse_loc(text, LABELS)
    assert len(back) == len(bs)
    cell = 1 / LOC_BINS
    assert all(_close(a, b, cell, cell) for a, b in zip(bs, back, strict=True)), (bs, text, back)


@settings(max_examples=200, deadline=None)
@given(st.lists(boxes(), min_size=1, max_size=4))
def test_qwen_round_trip_within_one_pixel(bs):
    text = format_qwen(bs, SIZE)
    back = parse_qwen(text, SIZE, LABELS)
    assert len(back) == len(bs)
    assert all(_close(a, b, 1 / SIZE[0], 1 / SIZE[1]) for a, b in zip(bs, back, strict=True)), (bs, text, back)


def test_loc_order_is_y_then_x_on_1024_bins():
    """PaliGemma writes y1 x1 y2 x2, each value / 1024 of the side (a naive reference for one box)."""
    box = {"label": "Cardiomegaly", "x1": 0.25, "y1": 0.5, "x2": 0.75, "y2": 1.0}
    assert format_loc([box]) == "<loc0512><loc0256><loc1023><loc0768> Cardiomegaly"
    assert parse_loc("<loc0512><loc0256><loc1023><loc0768> cardiomegaly", LABELS) == [
        {"label": "Cardiomegaly", "x1": 0.25, "y1": 0.5, "x2": 0.75, "y2": 1023 / 1024}
    ]


def test_qwen_is_absolute_pixels_x_then_y():
    box = {"label": "Pleural Effusion", "x1": 0.5, "y1": 0.25, "x2": 1.0, "y2": 0.5}
    assert json.loads(format_qwen([box], (200, 100))) == [{"bbox_2d": [100, 25, 200, 50], "label": "Pleural Effusion"}]


def test_qwen_reads_its_fenced_pretty_output_and_several_boxes():
    text = (
        "```json\n[\n\t{\"bbox_2d\": [10, 20, 110, 220], \"label\": \"right lung\"},\n"
        "\t{\"bbox_2d\": [150.5, 20, 190, 90], \"label\": \"cardiomegaly\"}\n]\n```"
    )
    got = parse_qwen(text, (200, 400), LABELS)
    assert [b["label"] for b in got] == ["right lung", "Cardiomegaly"]
    assert got[0] == {"label": "right lung", "x1": 0.05, "y1": 0.05, "x2": 0.55, "y2": 0.55}
    assert got[1]["x1"] == pytest.approx(150.5 / 200)


def test_degenerate_boxes_are_widened_to_one_cell():
    flat = {"label": "x", "x1": 0.5, "y1": 0.5, "x2": 0.5, "y2": 0.5}
    assert len(parse_loc(format_loc([flat]))) == 1
    assert len(parse_qwen(format_qwen([flat], SIZE), SIZE)) == 1


@pytest.mark.parametrize(
    "text",
    [
        "",
        "no findings",
        "<loc0100><loc0200><loc0300> cut short",
        "<loc0300><loc0200><loc0100><loc0400> y1 after y2",
        "<loc0100><loc0400><loc0300><loc0200> x1 after x2",
        "<loc0100><loc0200><loc1500><loc0400> beyond the grid",
        "<loc01><loc0200><loc0300><loc0400> short value",
        "<locabcd><loc0200><loc0300><loc0400>",
    ],
)
def test_malformed_loc_output_gives_no_box(text):
    assert parse_loc(text, LABELS) == []


@pytest.mark.parametrize(
    "text",
    [
        "",
        "[{\"bbox_2d\": [10, 20, 30], \"label\": \"a\"}]",
        "[{\"bbox_2d\": [10, 20, 30, 40, 50], \"label\": \"a\"}]",
        "[{\"bbox_2d\": [30, 20, 10, 40], \"label\": \"a\"}]",
        "[{\"bbox_2d\": [10, 20, 9999, 40], \"label\": \"a\"}]",
        "[{\"bbox_2d\": [-50, 20, 30, 40], \"label\": \"a\"}]",
        "[{\"bbox_2d\": [\"ten\", 20, 30, 40], \"label\": \"a\"}]",
        "[{\"bbox_2d\": [nan, 20, 30, 40], \"label\": \"a\"}]",
        "[{\"bbox_2d\": [10, 20, 30, 40",
        "{\"label\": \"a\"}",
        "{{{{ ]]]] bbox_2d",
    ],
)
def test_malformed_qwen_output_gives_no_box(text):
    assert parse_qwen(text, SIZE, LABELS) == []


def test_one_good_box_survives_a_malformed_neighbour():
    text = "<loc0100><loc0200><loc0300> ; <loc0100><loc0100><loc0200><loc0200> Fracture"
    assert [b["label"] for b in parse_loc(text, LABELS)] == ["Fracture"]


def test_dispatch_by_model_type():
    assert box_format_for("paligemma") == "loc"
    assert box_format_for("gemma3") == "loc"  # MedGemma is taught PaliGemma's format
    assert box_format_for("qwen2_5_vl") == "qwen-json"
    box = {"label": "a", "x1": 0.1, "y1": 0.2, "x2": 0.3, "y2": 0.4}
    assert parse_model_boxes("qwen-json", format_boxes("qwen-json", [box], SIZE), SIZE)[0]["label"] == "a"
    with pytest.raises(ValueError, match="resized image size"):
        format_boxes("qwen-json", [box])
    with pytest.raises(ValueError, match="unknown box format"):
        parse_model_boxes("yolo", "")
