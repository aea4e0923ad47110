"""Boxes as text: `{<x1><y1><x2><y2>}` (integers 0-100, LiteGPT / MiniGPT-v2), IoU, merging.

Boxes travel as the manifest's dicts `{label, x1, y1, x2, y2}` with coordinates normalised to [0, 1].
Same-label boxes that overlap with IoU > 0.5 describe one finding; `merge_boxes` keeps one representative
(the largest) and drops the rest, as LiteGPT section 4.2 does, through torchvision's batched NMS.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence

import torch
from torchvision.ops import batched_nms, box_iou

COORD_MAX = 100
NO_FINDINGS_TEXT = "no findings"
# A box in generated text; the tokenizer decodes added tokens with spaces around them, so allow whitespace.
_BOX_RE = re.compile(r"\{\s*<(\d{1,3})>\s*<(\d{1,3})>\s*<(\d{1,3})>\s*<(\d{1,3})>\s*\}")
_SEPARATOR = ";"


def to_grid(box: dict) -> tuple[int, int, int, int]:
    """Normalised [0, 1] box -> integer (x1, y1, x2, y2) on the 0-100 grid, clipped, ordered and at least one
    grid unit wide and high (so every target box is a valid box: x1 < x2, y1 < y2)."""
    vals = [min(COORD_MAX, max(0, round(float(box[k]) * COORD_MAX))) for k in ("x1", "y1", "x2", "y2")]
    x1, x2 = sorted((vals[0], vals[2]))
    y1, y2 = sorted((vals[1], vals[3]))
    if x1 == x2:
        x1, x2 = (x1, x1 + 1) if x1 < COORD_MAX else (x1 - 1, x1)
    if y1 == y2:
        y1, y2 = (y1, y1 + 1) if y1 < COORD_MAX else (y1 - 1, y1)
    return x1, y1, x2, y2


def format_box(box: dict) -> str:
    """`{<x1><y1><x2><y2>}` for one normalised box."""
    return "{" + "".join(f"<{v}>" for v in to_grid(box)) + "}"


def format_findings(boxes: Sequence[dict]) -> str:
    """`Label {<..>}; Label {<..>}` for a list of labelled boxes, or `no findings` when empty."""
    if not boxes:
        return NO_FINDINGS_TEXT
    return f"{_SEPARATOR} ".join(f"{b['label']} {format_box(b)}" for b in boxes)


def boxes_text(task: str, boxes: Sequence[dict]) -> str:
    """Boxes as an answer's text: `Name {<..>}; ...` for `[identify]`, else `{<..>} {<..>}` (one per box)."""
    if task == "identify":
        return format_findings(boxes)
    return " ".join(format_box(b) for b in boxes)


def parse_boxes(text: str, labels: Iterable[str] | None = None) -> list[dict]:
    """Every `[label] {<x1><y1><x2><y2>}` in `text` -> normalised box dicts, in order of appearance.

    The label is the text between the previous box (or separator) and this one; with `labels` given it is
    mapped case-insensitively onto that vocabulary (the uncased tokenizer lower-cases it). Malformed boxes
    (a coordinate above 100, x1 >= x2 or y1 >= y2) are skipped: they count as no prediction in evaluation
    and are never drawn; `malformed_boxes` counts them.
    """
    canon = {lab.lower(): lab for lab in labels} if labels is not None else {}
    out: list[dict] = []
    start = 0
    for m in _BOX_RE.finditer(text):
        raw_label = text[start : m.start()]
        start = m.end()
        raw_label = raw_label.split(_SEPARATOR)[-1].strip(" ,.:\n\t")
        raw_label = re.sub(r"\s+", " ", raw_label)
        coords = [int(g) for g in m.groups()]
        if not valid_coords(coords):
            continue
        label = canon.get(raw_label.lower(), raw_label)
        x1, y1, x2, y2 = (c / COORD_MAX for c in coords)
        out.append({"label": label, "x1": x1, "y1": y1, "x2": x2, "y2": y2})
    return out


def valid_coords(coords: Sequence[int]) -> bool:
    """Four integers on the 0-100 grid with x1 < x2 and y1 < y2."""
    return (
        len(coords) == 4
        and all(0 <= c <= COORD_MAX for c in coords)
        and coords[0] < coords[2]
        and coords[1] < coords[3]
    )


# Anything that starts a box: `{` followed by coordinate tokens, up to `}` or the next `{` / end of text.
_BOX_ATTEMPT_RE = re.compile(r"\{([^{}]*)(\}|(?=\{)|$)")


def malformed_boxes(text: str) -> tuple[int, int]:
    """(box attempts, malformed ones) in generated text: an attempt is malformed unless it is exactly four
    coordinates `<a><b><c><d>` closed by `}` with x1 < x2 and y1 < y2."""
    attempts = bad = 0
    for m in _BOX_ATTEMPT_RE.finditer(text):
        attempts += 1
        coords = re.fullmatch(r"\s*<(\d{1,3})>\s*<(\d{1,3})>\s*<(\d{1,3})>\s*<(\d{1,3})>\s*", m.group(1))
        if m.group(2) != "}" or coords is None or not valid_coords([int(g) for g in coords.groups()]):
            bad += 1
    return attempts, bad


def boxes_tensor(boxes: Sequence[dict]) -> torch.Tensor:
    """(N, 4) float tensor of x1, y1, x2, y2."""
    if not boxes:
        return torch.zeros((0, 4), dtype=torch.float32)
    return torch.tensor([[b["x1"], b["y1"], b["x2"], b["y2"]] for b in boxes], dtype=torch.float32)


def iou(a: dict, b: dict) -> float:
    """Intersection over union of two normalised boxes (torchvision's box_iou; 0 for two empty boxes)."""
    v = float(box_iou(boxes_tensor([a]), boxes_tensor([b]))[0, 0])
    return 0.0 if v != v else v


def merge_boxes(boxes: Sequence[dict], iou_threshold: float = 0.5) -> list[dict]:
    """Drop same-label boxes overlapping a larger kept one with IoU > `iou_threshold`; keeps input order."""
    if len(boxes) <= 1:
        return list(boxes)
    t = boxes_tensor(boxes)
    areas = (t[:, 2] - t[:, 0]).clamp(min=0) * (t[:, 3] - t[:, 1]).clamp(min=0)
    names = sorted({b["label"] for b in boxes})
    idxs = torch.tensor([names.index(b["label"]) for b in boxes])
    # Ties in area keep the earlier box: a tiny index-dependent bonus makes the order deterministic.
    scores = areas.double() - torch.arange(len(boxes), dtype=torch.float64) * 1e-9
    keep = batched_nms(t.double(), scores, idxs, iou_threshold)
    return [boxes[i] for i in sorted(keep.tolist())]


def snap(box: dict) -> dict:
    """The box as it reads back from text: coordinates on the 0-100 grid."""
    x1, y1, x2, y2 = to_grid(box)
    return {"label": box.get("label", ""), "x1": x1 / 100, "y1": y1 / 100, "x2": x2 / 100, "y2": y2 / 100}
