"""Importers: turn a dataset as downloaded into a study manifest (one module per source).

`import_source(kind, src, **options)` returns the manifest DataFrame; rows that had to be skipped are listed
in ``df.attrs["import_problems"]`` and facts worth telling in ``df.attrs["import_notes"]``.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pandas as pd

from retrieval.data.importers.common import NOTES, PROBLEMS, map_label, relativize_paths
from retrieval.errors import UsageError

KINDS: tuple[str, ...] = ("iu-xray", "mimic-cxr", "covid-cxr", "yolo", "coco", "csv", "dicom", "dicomweb")


def _importer(kind: str) -> Callable[..., pd.DataFrame]:
    if kind == "iu-xray":
        from retrieval.data.importers.iu_xray import import_iu_xray

        return import_iu_xray
    if kind == "mimic-cxr":
        from retrieval.data.importers.mimic_cxr import import_mimic_cxr

        return import_mimic_cxr
    if kind == "covid-cxr":
        from retrieval.data.importers.covid_cxr import import_covid_cxr

        return import_covid_cxr
    if kind == "yolo":
        from retrieval.data.importers.yolo import import_yolo

        return import_yolo
    if kind == "coco":
        from retrieval.data.importers.coco import import_coco

        return import_coco
    if kind == "csv":
        from retrieval.data.importers.csv_import import import_csv

        return import_csv
    if kind == "dicom":
        from retrieval.data.importers.dicom_folder import import_dicom_folder

        return import_dicom_folder
    if kind == "dicomweb":
        from retrieval.data.importers.dicomweb import import_dicomweb

        return import_dicomweb
    raise UsageError(f"unknown import kind {kind!r} (choose from {', '.join(KINDS)})")


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
