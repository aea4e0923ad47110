"""Importers: turn a dataset as downloaded into a study manifest (one module per source).

`import_source(kind, src, **options)` returns the manifest DataFrame; rows that had to be skipped are listed
in ``df.attrs["import_problems"]`` and facts worth telling in ``df.attrs["import_notes"]``.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pandas as pd

from retrieval.data.importers.common import NOTES, PROBLEMS, map_label, relativize_paths
from retrieval.errors import UsageError

# Each kind's importer as (module under retrieval.data.importers, function), imported only when asked for.
_IMPORTERS: dict[str, tuple[str, str]] = {
    "iu-xray": ("iu_xray", "import_iu_xray"),
    "mimic-cxr": ("mimic_cxr", "import_mimic_cxr"),
    "covid-cxr": ("covid_cxr", "import_covid_cxr"),
    "yolo": ("yolo", "import_yolo"),
    "coco": ("coco", "import_coco"),
    "csv": ("csv_import", "import_csv"),
    "dicom": ("dicom_folder", "import_dicom_folder"),
    "dicomweb": ("dicomweb", "import_dicomweb"),
}
KINDS: tuple[str, ...] = tuple(_IMPORTERS)


def _importer(kind: str) -> Callable[..., pd.DataFrame]:
    if kind not in _IMPORTERS:
        raise UsageError(f"unknown import kind {kind!r} (choose from {', '.join(KINDS)})")
    module, function = _IMPORTERS[kind]
    return getattr(importlib.import_module(f"{__name__}.{module}"), function)


def import_source(kind: str, src: str | Path, **options: Any) -> pd.DataFrame:
    """Import dataset `src` of the given kind ('iu-xray', 'mimic-cxr', 'covid-cxr', 'yolo', 'coco', 'csv', 'dicom'
    (a folder), 'dicomweb' (an archive's URL)).

    Options (each importer takes the ones it knows, ignores the rest): images (image folder), boxes (COCO box
    file, covid-cxr), reports (MIMIC report folder; dicom/dicomweb: a report CSV), column_map (csv), seed (for
    patient-disjoint splits), pseudonymize (dicom/dicomweb: the HMAC key); dicomweb: see importers/dicomweb.py.

    The folders the importer read that hold the images (`dataset_roots.image_roots`) are recorded in
    ``df.attrs["dataset_roots"]``; `write_manifest` keeps them in the Parquet file."""
    from retrieval.data import dataset_roots

    importer = _importer(kind)
    options = {k: v for k, v in options.items() if v is not None}
    df = importer(src, **options)
    folder = Path(src) if Path(src).is_dir() else Path(src).parent if Path(src).is_file() else None
    declared = (options.get("images"), options.get("cache"), folder)
    df.attrs[dataset_roots.ATTR] = dataset_roots.image_roots(df["image_path"] if len(df) else [], declared)
    return df


__all__ = ["KINDS", "NOTES", "PROBLEMS", "import_source", "map_label", "relativize_paths"]
