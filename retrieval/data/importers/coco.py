"""COCO detection files: a JSON of images, annotations (pixel x, y, w, h) and categories, plus image folder.

Each image is its own study and patient unless its COCO entry carries `study_id` / `patient_id` / `split`.
Boxes keep the category names; image labels are the names that map to the vocabulary. Images whose file is
missing are skipped and reported.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pandas as pd

from retrieval.data.importers.common import box_from_xywh, finish, index_images, map_label, vocabulary
from retrieval.errors import ImportError_
from retrieval.progress import track


def read_coco(path: Path) -> tuple[list[Any], dict[Any, str], list[dict[str, Any]]]:
    """A COCO file's image entries, category names by id and annotations; ImportError_ when it cannot be read."""
    try:
        coco = json.loads(path.read_text())
        entries = list(coco["images"])
        categories = {c["id"]: str(c["name"]) for c in coco.get("categories", [])}
        annotations = list(coco.get("annotations", []))
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ImportError_(f"{path}: not a readable COCO file: {type(e).__name__}: {e}") from None
    return entries, categories, annotations


def boxes_by_image(
    where: str, entries: list[Any], categories: dict[Any, str], annotations: list[dict[str, Any]]
) -> tuple[dict[Any, list[dict[str, Any]]], list[str]]:
    """The annotations as normalised boxes (by the image's width and height) keyed by COCO image id, and the ones
    skipped ('where: annotation N: why': malformed, empty, or an image of unknown size)."""
    problems: list[str] = []
    by_image: dict[Any, list[dict[str, Any]]] = {}
    sizes = {e.get("id"): (e.get("width", 0), e.get("height", 0)) for e in entries if isinstance(e, dict)}
    for ann in annotations:
        try:
            x, y, w, h = (float(v) for v in ann["bbox"])
            label = categories.get(ann["category_id"], str(ann["category_id"]))
            width, height = sizes[ann["image_id"]]
            box = box_from_xywh(label, x, y, w, h, float(width or 0), float(height or 0))
        except (KeyError, TypeError, ValueError) as e:
            problems.append(f"{where}: annotation {ann.get('id', '?')}: malformed ({type(e).__name__}: {e})")
            continue
        if box is None:
            problems.append(f"{where}: annotation {ann.get('id', '?')}: empty box or unknown image size, skipped")
            continue
        by_image.setdefault(ann["image_id"], []).append(box)
    return by_image, problems


def import_coco(
    src: str | Path,
    images: str | Path | None = None,
    seed: int = 0,
    **_: Any,
) -> pd.DataFrame:
    """A manifest from a COCO JSON file; images are looked up in `images` (default: the JSON's folder, its
    `images/` sub-folder, then the parent of an `annotations/` folder) by relative path, then by file name."""
    src = Path(src)
    entries, categories, annotations = read_coco(src)
    if images:
        folders = [Path(images)]
    else:
        folders = [src.parent, src.parent / "images"]
        if src.parent.name == "annotations":
            folders += [src.parent.parent, src.parent.parent / "images"]
    by_name: dict[str, Path] = {}
    for folder in reversed(folders):
        by_name.update(index_images(folder))

    by_image, problems = boxes_by_image(src.name, entries, categories, annotations)

    order = {label: i for i, label in enumerate(vocabulary())}
    rows = []
    for entry in track(entries, "coco images", unit="images"):
        name = str(entry.get("file_name", "")) if isinstance(entry, dict) else ""
        if not name:
            problems.append(f"{src.name}: image entry {entry!r:.60} has no file_name, skipped")
            continue
        path = next((f / name for f in folders if (f / name).is_file()), None) or by_name.get(Path(name).name)
        if path is None:
            problems.append(f"{src.name}: image {name}: file not found, skipped")
            continue
        boxes = by_image.get(entry.get("id"), [])
        labels = {map_label(b["label"]) for b in boxes} - {None}
        image_id = str(Path(name).with_suffix("").as_posix())
        rows.append(
            {
                "image_id": image_id,
                "study_id": str(entry.get("study_id") or image_id),
                "patient_id": str(entry.get("patient_id") or entry.get("study_id") or image_id),
                "image_path": str(path.resolve()),
                "labels": sorted(labels, key=lambda x: order.get(x, len(order))),
                "boxes": boxes,
                "split": str(entry.get("split") or ""),
            }
        )
    notes = []
    unmapped = sorted(n for n in categories.values() if map_label(n) is None)
    if unmapped:
        notes.append(f"category names with no vocabulary label (boxes only): {', '.join(unmapped)}")
    return finish(rows, "coco", seed=seed, problems=problems, notes=notes)
