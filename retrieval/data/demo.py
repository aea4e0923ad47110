"""The embedded demo corpus: one synthetic radiograph (`retrieval.data.phantom`) per real IU X-ray report.

No real image collection can ship with the package, but the Open-I report XMLs do (inside torchxrayvision), so
`build_demo_corpus` renders an image for every report that has text: real reports, images that agree with them,
and ground-truth boxes. It is a demo and a test bed, not clinical data.

Manifest (`DIR/manifest.parquet`), one row per study (each IU study is one patient and gets one PA image):

* `labels`: the labels implied by the study's manual MeSH indexing (`retrieval.labels.labels_from_mesh`), which
  is human-curated and independent of our text labeler, so the labeler and clinical-efficacy metrics can be
  scored against it; studies without MeSH indexing ("No Indexing") fall back to `label_report(text)`.
  `labels_text` holds the labeler's labels for every study, `label_source` says which one `labels` is.
* `boxes`: the rendered findings' boxes (labels like "Pleural Effusion", "Nodule", "Pacemaker") followed by the
  anatomy boxes, whose labels carry the prefix `anatomy:` ("anatomy:Right Lung", "anatomy:Heart" ...).
* `masks`: the region masks (the lungs and the heart as `anatomy:Right Lung`, `anatomy:Left Lung`,
  `anatomy:Heart`, and each drawn finding by its box label), one JSON object of COCO RLEs per row
  (`retrieval.data.region_masks.masks_from_json`); a finding's box is its mask's bounding box.
* `unrendered`: findings the report names positively that the renderer does not draw (e.g. "kyphosis").
* `mesh`: the MeSH terms; `seed`: the per-study render seed; splits by patient (80/10/10, from `seed`).

`DIR/demo_info.json` is written last; a later call with the same size, seed, limit and version returns the
existing corpus at once.
"""

from __future__ import annotations

import json
import os
import time
import zlib
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from retrieval.data.importers.iu_xray import read_iu_reports
from retrieval.study_text import report_text

DEMO_VERSION = 2  # 2: the `masks` column (the images are those of 1: the phantom's VERSION keys them)
INFO_NAME = "demo_info.json"
MANIFEST_NAME = "manifest.parquet"


def study_seed(seed: int, study_id: str) -> int:
    """The render seed of one study: stable across runs, machines and Python hash seeds."""
    return zlib.crc32(f"{int(seed)}:{study_id}".encode())


def _render_one(task: tuple[dict[str, Any], str, int, int]) -> dict[str, Any]:
    """Worker: render one study, write its PNG atomically, return its manifest row."""
    from PIL import Image

    from retrieval.data.phantom import render_phantom
    from retrieval.data.region_masks import masks_to_json
    from retrieval.labels import label_report, labels_from_mesh

    rec, out_dir, size, seed = task
    report = report_text(rec)
    sseed = study_seed(seed, rec["study_id"])
    ph = render_phantom(report, size=size, seed=sseed)
    rel = f"images/{rec['study_id']}.png"
    path = Path(out_dir) / rel
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    Image.fromarray(np.round(ph.image * 255).astype(np.uint8), mode="L").save(tmp, format="PNG", compress_level=1)
    os.replace(tmp, path)
    text_labels = label_report(report)
    indexed = bool(rec["mesh"]) and rec["mesh"] != ["No Indexing"]
    return {
        "image_id": rec["study_id"],
        "study_id": rec["study_id"],
        "patient_id": rec["study_id"],
        "image_path": rel,
        "view": "PA",
        "report": report,
        "findings": rec["findings"],
        "impression": rec["impression"],
        "labels": labels_from_mesh(rec["mesh"]) if indexed else text_labels,
        "boxes": ph.boxes,
        "split": "",
        "source": "demo",
        "labels_text": text_labels,
        "label_source": "mesh" if indexed else "labeler",
        "unrendered": list(ph.unrendered),
        "masks": masks_to_json(ph.masks),
        "mesh": list(rec["mesh"]),
        "seed": sseed,
    }


def _info_matches(out_dir: Path, want: dict[str, Any]) -> bool:
    info_path = out_dir / INFO_NAME
    if not info_path.is_file() or not (out_dir / MANIFEST_NAME).is_file():
        return False
    try:
        info = json.loads(info_path.read_text())
    except (OSError, ValueError):
        return False
    return all(info.get(k) == v for k, v in want.items())


def build_demo_corpus(
    out_dir: str | Path,
    size: int = 256,
    seed: int = 0,
    limit: int | None = None,
    workers: int = 2,
    show_progress: bool = True,
    src: str | Path = "builtin",
) -> pd.DataFrame:
    """Render the demo corpus into `out_dir` (images/, manifest.parquet, demo_info.json) and return its manifest.

    Returns the existing corpus at once when `out_dir` already holds a complete one for the same size, seed,
    limit and version (demo_info.json is written last, so a killed run is never mistaken for a complete one).
    Deterministic for a seed; `workers` processes render in parallel."""
    from retrieval.data.manifest import assign_splits, read_manifest, write_manifest
    from retrieval.data.phantom import VERSION as PHANTOM_VERSION
    from retrieval.errors import UsageError
    from retrieval.fileio import write_json_atomic
    from retrieval.progress import make_progress

    if size < 64 or size > 2048:
        raise UsageError(f"--size {size}: choose 64..2048 pixels")
    if limit is not None and limit < 1:
        raise UsageError(f"--limit {limit}: must be at least 1")
    out_dir = Path(out_dir)
    want = {
        "size": int(size),
        "seed": int(seed),
        "limit": limit,
        "version": f"{DEMO_VERSION}.{PHANTOM_VERSION}",
    }
    if _info_matches(out_dir, want):
        df = read_manifest(out_dir / MANIFEST_NAME)
        df.attrs["cached"] = True
        return df
    t0 = time.perf_counter()
    reports = [r for r in read_iu_reports(src) if (r["findings"] or r["impression"]).strip()]
    if limit is not None:
        reports = reports[:limit]
    (out_dir / "images").mkdir(parents=True, exist_ok=True)
    (out_dir / INFO_NAME).unlink(missing_ok=True)
    tasks = [(r, str(out_dir), int(size), int(seed)) for r in reports]
    rows: list[dict[str, Any]] = []
    with make_progress(disable=not show_progress) as progress:
        bar = progress.add_task("rendering demo radiographs", total=len(tasks), unit="images")
        if workers <= 1:
            for t in tasks:
                rows.append(_render_one(t))
                progress.advance(bar)
        else:
            with ProcessPoolExecutor(max_workers=workers) as pool:
                for row in pool.map(_render_one, tasks, chunksize=16):
                    rows.append(row)
                    progress.advance(bar)
    df = assign_splits(pd.DataFrame(rows), seed=seed)
    write_manifest(df, out_dir / MANIFEST_NAME)
    elapsed = time.perf_counter() - t0
    write_json_atomic(
        out_dir / INFO_NAME,
        {
            **want,
            "studies": len(df),
            "images": len(df),
            "seconds": round(elapsed, 1),
            "workers": workers,
            "labels": "MeSH-implied (labels_from_mesh); labeler on the text where a study has no MeSH indexing",
            "boxes": "finding boxes, then anatomy boxes labelled 'anatomy:<name>'",
            "masks": "COCO RLE per region (anatomy:Right Lung, anatomy:Left Lung, anatomy:Heart, drawn findings)",
            "note": "synthetic images rendered from real IU X-ray reports: a demo and test bed, not clinical data",
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        },
    )
    df = read_manifest(out_dir / MANIFEST_NAME)
    df.attrs["cached"] = False
    df.attrs["seconds"] = elapsed
    return df
