"""The study view the server gives: a study's record from the index meta, and PNG thumbnails of its images.

Study ids are looked up in the snapshot's meta rows, never joined into file paths.
"""

from __future__ import annotations

import io
import threading
from collections import OrderedDict

import numpy as np

from retrieval.errors import UsageError
from serve.snapshot import IndexSnapshot

THUMB_SIZES = (16, 1024)


def study_record(snap: IndexSnapshot, study_id: str) -> dict | None:
    """The study's report, labels, split and images (None when the index does not hold it)."""
    rows = snap.study_rows.get(str(study_id))
    if rows is None:
        return None
    meta = snap.searcher.index.meta.iloc[rows]
    labels: list[str] = []
    for labs in meta["labels"]:
        for lab in labs if labs is not None else []:
            if str(lab) not in labels:
                labels.append(str(lab))
    with_report = meta[meta["has_report"].astype(bool)]
    first = meta.iloc[0]
    study_tags = ("study_instance_uid", "accession_number", "study_date", "modality")  # '' for non-DICOM rows
    return {
        "study_id": str(study_id),
        "patient_id": str(first["patient_id"]),
        **{tag: str(first.get(tag) or "") for tag in study_tags},
        "report": str(with_report.iloc[0]["report"]) if len(with_report) else "",
        "labels": labels,
        "split": str(first["split"]),
        "images": [
            {
                "image_id": str(r["image_id"]),
                "row_id": int(r["row_id"]),
                "view": str(r["view"]),
                "series_instance_uid": str(r.get("series_instance_uid") or ""),
                "sop_instance_uid": str(r.get("sop_instance_uid") or ""),
            }
            for r in meta.to_dict("records")
        ],
    }


def render_thumbnail(image_path: str, size: int) -> bytes:
    """A PNG of the image, its longer side `size` pixels (down with Lanczos, up with bicubic)."""
    from PIL import Image

    from retrieval.data.image_io import read_image

    pixels = read_image(image_path)
    img = Image.fromarray((np.clip(pixels, 0, 1) * 255).round().astype(np.uint8))
    scale = size / max(img.size)
    if scale != 1:
        method = Image.Resampling.LANCZOS if scale < 1 else Image.Resampling.BICUBIC
        img = img.resize((max(1, round(img.width * scale)), max(1, round(img.height * scale))), method)
    buf = io.BytesIO()
    img.save(buf, format="PNG", optimize=False)
    return buf.getvalue()


class Thumbnails:
    """Thumbnails of a snapshot's studies, the last `capacity` kept (keyed by generation, row and size)."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        self._cache: OrderedDict[tuple, bytes] = OrderedDict()
        self._lock = threading.Lock()

    def clear(self) -> None:
        with self._lock:
            self._cache.clear()

    def get(self, snap: IndexSnapshot, study_id: str, size: int = 256, image_id: str | None = None) -> bytes | None:
        """A PNG of the study's first image (or of `image_id`, which must belong to the study), its longer side
        `size` pixels. The file is the one the index meta names; None when the study or image is unknown.
        Raises ImageReadError when that file can no longer be read."""
        lo, hi = THUMB_SIZES
        if not isinstance(size, int) or not lo <= size <= hi:
            raise UsageError(f"size must be an integer from {lo} to {hi}, got {size!r}")
        rows = snap.study_rows.get(str(study_id))
        if rows is None:
            return None
        meta = snap.searcher.index.meta
        if image_id is not None:
            rows = [r for r in rows if str(meta.iloc[r]["image_id"]) == str(image_id)]
            if not rows:
                return None
        row = int(rows[0])
        key = (snap.generation, row, size)
        with self._lock:
            if key in self._cache:
                self._cache.move_to_end(key)
                return self._cache[key]
        data = render_thumbnail(str(meta.iloc[row]["image_path"]), size)
        with self._lock:
            self._cache[key] = data
            while len(self._cache) > self.capacity:
                self._cache.popitem(last=False)
        return data
