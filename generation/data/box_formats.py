"""The box formats of pretrained image-text-to-text VLMs, both ways: our boxes <-> the model's own text.

Our boxes are the manifest's dicts `{label, x1, y1, x2, y2}`, normalised to [0, 1] (`boxes.py`).

- `loc` (PaliGemma / PaliGemma 2, also used for MedGemma): four location tokens `<locNNNN>` in the order
  y1 x1 y2 x2, each a bin of a 1024-step grid over the image (value / 1024 of its height or width), followed by
  the label; several boxes are joined with ` ; ` (`<loc0256><loc0128><loc0768><loc0512> cardiomegaly ; ...`).
- `qwen-json` (Qwen2.5-VL): a JSON list of `{"bbox_2d": [x1, y1, x2, y2], "label": "..."}` in absolute pixels of
  the image as the model saw it (after its processor resized it); the model often wraps it in a ```json fence.

Parsing never raises on model output: a box that is cut short, out of range, not a number or empty
(x1 >= x2 or y1 >= y2) is skipped, so malformed output yields fewer boxes (possibly none), never a crash.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable, Sequence

FORMATS = ("loc", "qwen-json")
LOC_BINS = 1024
# Model families by transformers `model_type` that speak qwen-json in absolute pixels: Qwen2.5-VL only (Qwen2-VL
# writes `<|box_start|>(x1,y1),(x2,y2)<|box_end|>` and Qwen3-VL JSON, both on a relative 0-1000 grid: not wired
# here). Anything else (MedGemma's gemma3, ...) is taught the loc format.
_QWEN_TYPES = ("qwen2_5_vl",)
_LOC_BOX_RE = re.compile(r"((?:<loc\d{4}>\s*){4})([^;<]*)")
_LOC_VALUE_RE = re.compile(r"<loc(\d{4})>")
_JSON_OBJECT_RE = re.compile(r"\{[^{}]*\}")
_BBOX_RE = re.compile(r"\"bbox_2d\"\s*:\s*\[([^\[\]]*)\]")
_LABEL_RE = re.compile(r"\"label\"\s*:\s*\"([^\"]*)\"")


def box_format_for(model_type: str) -> str:
    """The box format a model family speaks: `qwen-json` for Qwen-VL, else `loc` (PaliGemma's)."""
    return "qwen-json" if model_type in _QWEN_TYPES else "loc"


def _canon(label: str, labels: Iterable[str] | None) -> str:
    """`label` mapped case-insensitively onto `labels` (when given), whitespace collapsed."""
    label = re.sub(r"\s+", " ", label).strip(" ,.:\n\t")
    canon = {lab.lower(): lab for lab in labels} if labels is not None else {}
    return canon.get(label.lower(), label)


def _ordered(a: int, b: int, top: int) -> tuple[int, int]:
    """Two grid values as an ordered pair at least one step apart, within 0..top."""
    a, b = sorted((a, b))
    if a == b:
        a, b = (a, a + 1) if a < top else (a - 1, a)
    return a, b


# ---- loc (PaliGemma) ----


def to_loc_bins(box: dict) -> tuple[int, int, int, int]:
    """Normalised box -> (y1, x1, y2, x2) bins on the 0..1023 grid (clipped; at least one bin wide and high)."""
    top = LOC_BINS - 1
    x1, y1, x2, y2 = (min(top, max(0, round(float(box[k]) * LOC_BINS))) for k in ("x1", "y1", "x2", "y2"))
    x1, x2 = _ordered(x1, x2, top)
    y1, y2 = _ordered(y1, y2, top)
    return y1, x1, y2, x2


def format_loc(boxes: Sequence[dict]) -> str:
    """`<locY1><locX1><locY2><locX2> label ; ...` for our boxes (the label left out when empty)."""
    parts = []
    for b in boxes:
        locs = "".join(f"<loc{v:04d}>" for v in to_loc_bins(b))
        label = str(b.get("label") or "").strip()
        parts.append(f"{locs} {label}".strip())
    return " ; ".join(parts)


def parse_loc(text: str, labels: Iterable[str] | None = None) -> list[dict]:
    """Every four-`<loc>` box in `text` -> our normalised boxes, labelled by the text after it."""
    out = []
    for m in _LOC_BOX_RE.finditer(text):
        y1, x1, y2, x2 = (int(v) for v in _LOC_VALUE_RE.findall(m.group(1)))
        if max(y1, x1, y2, x2) >= LOC_BINS or x1 >= x2 or y1 >= y2:
            continue
        out.append(
            {
                "label": _canon(m.group(2), labels),
                "x1": x1 / LOC_BINS,
                "y1": y1 / LOC_BINS,
                "x2": x2 / LOC_BINS,
                "y2": y2 / LOC_BINS,
            }
        )
    return out


# ---- qwen-json (Qwen2.5-VL) ----


def to_pixels(box: dict, size: tuple[int, int]) -> list[int]:
    """Normalised box -> [x1, y1, x2, y2] integer pixels of an image `size` = (width, height)."""
    w, h = size
    x1, x2 = _ordered(*(min(w, max(0, round(float(box[k]) * w))) for k in ("x1", "x2")), w)
    y1, y2 = _ordered(*(min(h, max(0, round(float(box[k]) * h))) for k in ("y1", "y2")), h)
    return [x1, y1, x2, y2]


def format_qwen(boxes: Sequence[dict], size: tuple[int, int]) -> str:
    """`[{"bbox_2d": [x1, y1, x2, y2], "label": "..."}, ...]` in pixels of the resized image `size` (w, h)."""
    items = [{"bbox_2d": to_pixels(b, size), "label": str(b.get("label") or "")} for b in boxes]
    return json.dumps(items)


def _numbers(raw: str) -> list[float] | None:
    """'1, 2.5, 3, 4' -> floats, None when any part is not a finite number."""
    try:
        vals = [float(v) for v in raw.split(",")]
    except ValueError:
        return None
    return vals if all(math.isfinite(v) for v in vals) else None


def parse_qwen(text: str, size: tuple[int, int], labels: Iterable[str] | None = None) -> list[dict]:
    """Every `{"bbox_2d": [...], "label": ...}` object in `text` (fenced or not, complete JSON or not) -> our
    boxes, normalised by the resized image `size` (w, h). A coordinate more than one pixel outside the image is
    malformed; one within a pixel is clipped."""
    w, h = size
    out = []
    for m in _JSON_OBJECT_RE.finditer(text):
        bbox = _BBOX_RE.search(m.group(0))
        vals = _numbers(bbox.group(1)) if bbox else None
        if vals is None or len(vals) != 4:
            continue
        x1, y1, x2, y2 = vals
        if min(vals) < -1 or max(x1, x2) > w + 1 or max(y1, y2) > h + 1 or x1 >= x2 or y1 >= y2:
            continue
        lab = _LABEL_RE.search(m.group(0))
        out.append(
            {
                "label": _canon(lab.group(1) if lab else "", labels),
                "x1": min(1.0, max(0.0, x1 / w)),
                "y1": min(1.0, max(0.0, y1 / h)),
                "x2": min(1.0, max(0.0, x2 / w)),
                "y2": min(1.0, max(0.0, y2 / h)),
            }
        )
    return out


# ---- either ----


def format_boxes(fmt: str, boxes: Sequence[dict], size: tuple[int, int] | None = None) -> str:
    """Our boxes as the model's text; `size` (w, h of the resized image) is needed by `qwen-json`."""
    if fmt == "loc":
        return format_loc(boxes)
    if fmt == "qwen-json":
        if size is None:
            raise ValueError("the qwen-json box format needs the resized image size")
        return format_qwen(boxes, size)
    raise ValueError(f"unknown box format {fmt!r}; choose from {FORMATS}")


def parse_model_boxes(
    fmt: str, text: str, size: tuple[int, int] | None = None, labels: Iterable[str] | None = None
) -> list[dict]:
    """The model's text -> our boxes (malformed ones skipped); `labels` maps names onto a vocabulary."""
    if fmt == "loc":
        return parse_loc(text, labels)
    if fmt == "qwen-json":
        if size is None:
            raise ValueError("the qwen-json box format needs the resized image size")
        return parse_qwen(text, size, labels)
    raise ValueError(f"unknown box format {fmt!r}; choose from {FORMATS}")
