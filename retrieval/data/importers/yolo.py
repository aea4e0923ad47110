"""YOLO detection datasets: images/, labels/<stem>.txt ('class cx cy w h' normalised), data.yaml class names.

Each image is its own study and patient (YOLO carries no patient ids). Boxes keep the dataset's class names;
image labels are those names mapped to the vocabulary where they match (TBX11K's TB classes -> Tuberculosis).
Images in images/train, images/val, images/test keep that split; the rest get patient-disjoint splits.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd

from retrieval.data.importers.common import (
    IMAGE_SUFFIXES,
    clip_box,
    finish,
    map_label,
    normalize_split,
    vocabulary,
)
from retrieval.errors import ImportError_
from retrieval.progress import track


def read_yaml(path: str | Path) -> dict[str, Any]:
    """A YAML file as a dict: PyYAML when installed, else a small parser for the flat `key: value` and
    `names:` (list or index map) layout that YOLO's data.yaml uses."""
    path = Path(path)
    text = path.read_text()
    try:
        import yaml
    except ImportError:
        return _parse_simple_yaml(text)
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ImportError_(f"{path}: not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ImportError_(f"{path}: expected a mapping at the top level")
    return data


def _scalar(text: str) -> Any:
    text = text.strip()
    if len(text) >= 2 and text[0] == text[-1] and text[0] in "'\"":
        return text[1:-1]
    try:
        return int(text)
    except ValueError:
        return text


def _parse_simple_yaml(text: str) -> dict[str, Any]:
    data: dict[str, Any] = {}
    current: str | None = None
    for raw in text.splitlines():
        line = raw.split(" #")[0].rstrip() if not raw.lstrip().startswith("#") else ""
        if not line.strip():
            continue
        indented = line[0] in " \t"
        body = line.strip()
        if indented and current is not None:
            if body.startswith("- "):
                if not isinstance(data.get(current), list):
                    data[current] = []
                data[current].append(_scalar(body[2:]))
            elif ":" in body:
                key, value = body.split(":", 1)
                if not isinstance(data.get(current), dict):
                    data[current] = {}
                data[current][_scalar(key)] = _scalar(value)
            continue
        key, _, value = body.partition(":")
        current = key.strip()
        value = value.strip()
        if value.startswith("[") and value.endswith("]"):
            data[current] = [_scalar(v) for v in value[1:-1].split(",") if v.strip()]
        else:
            data[current] = _scalar(value) if value else None
    return data


def class_names(data: dict[str, Any]) -> dict[int, str]:
    """data.yaml `names` (a list, or a mapping index -> name) as {index: name}."""
    names = data.get("names")
    if isinstance(names, list):
        return {i: str(n) for i, n in enumerate(names)}
    if isinstance(names, dict):
        return {int(k): str(v) for k, v in names.items()}
    return {}


def import_yolo(src: str | Path, images: str | Path | None = None, seed: int = 0, **_: Any) -> pd.DataFrame:
    """A manifest from a YOLO folder (with data.yaml) or from its data.yaml."""
    src = Path(src)
    yaml_path = (
        src if src.is_file() else next((src / n for n in ("data.yaml", "data.yml") if (src / n).is_file()), None)
    )
    if yaml_path is None:
        raise ImportError_(f"{src}: no data.yaml (YOLO class names) found")
    data = read_yaml(yaml_path)
    names = class_names(data)
    if not names:
        raise ImportError_(f"{yaml_path}: no class `names`")
    base = (yaml_path.parent / str(data.get("path") or ".")).resolve()
    image_dir = Path(images) if images else base / str(data.get("images") or "images")
    label_dir = base / str(data.get("labels") or "labels")
    if not image_dir.is_dir():
        raise ImportError_(f"{image_dir}: image folder not found")

    paths = sorted(p for p in image_dir.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    problems: list[str] = []
    mapped = {i: map_label(n) for i, n in names.items()}
    order = {label: i for i, label in enumerate(vocabulary())}
    rows = []
    empty: list[str] = []
    for path in track(paths, "yolo images", unit="images"):
        rel = path.relative_to(image_dir)
        label_path = label_dir / rel.with_suffix(".txt")
        if not label_path.is_file():
            label_path = label_dir / f"{path.stem}.txt"
        boxes, labels = [], set()
        if label_path.is_file() and not label_path.read_text().strip():
            empty.append(path.name)
        elif label_path.is_file():
            for n, line in enumerate(label_path.read_text().splitlines(), start=1):
                if not line.strip():
                    continue
                where = f"{label_path.name} line {n}"
                parts = line.split()
                try:
                    cls = int(float(parts[0]))
                    cx, cy, w, h = (float(v) for v in parts[1:5])
                    if len(parts) != 5:
                        raise ValueError(f"{len(parts)} fields")
                except (ValueError, IndexError) as e:
                    problems.append(f"{where}: expected 'class cx cy w h' ({e}), box skipped")
                    continue
                if cls not in names:
                    problems.append(f"{where}: class {cls} is not in data.yaml names, box skipped")
                    continue
                box = clip_box(names[cls], cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2)
                if box is None:
                    problems.append(f"{where}: empty box, skipped")
                    continue
                boxes.append(box)
                if mapped[cls]:
                    labels.add(mapped[cls])
        else:
            problems.append(f"{path.name}: no label file {label_path.name} (image kept, no boxes)")
        top = rel.parts[0] if len(rel.parts) > 1 else ""
        image_id = rel.with_suffix("").as_posix()
        rows.append(
            {
                "image_id": image_id,
                "study_id": image_id,
                "patient_id": image_id,
                "image_path": str(path.resolve()),
                "labels": sorted(labels, key=lambda x: order.get(x, len(order))),
                "boxes": boxes,
                "split": normalize_split(top),
            }
        )
    if not rows:
        problems.append(f"{image_dir}: no image files found")
    unmapped = sorted(n for i, n in names.items() if not mapped[i])
    notes = [f"class names with no vocabulary label (boxes only): {', '.join(unmapped)}"] if unmapped else []
    if empty:
        notes.append(f"{len(empty)} images have an empty label file (no boxes, no labels): {', '.join(empty[:5])}")
    notes.append("YOLO has no patient ids: each image is its own study and patient")
    return finish(rows, "yolo", seed=seed, problems=problems, notes=notes)
