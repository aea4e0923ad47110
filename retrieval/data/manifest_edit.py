"""Combining and re-splitting manifests (`cxr data merge`, `cxr data split`).

`merge_manifests` reads several manifests, makes every image path absolute against its own manifest's folder, and
stacks the rows; ids that two manifests share are refused (or prefixed with each manifest's name, `prefix=True`),
and a patient whose rows carry two different splits is reported. `resplit` assigns new patient-disjoint splits,
seeded, through `manifest.assign_splits`. The caller writes the result with `relativize_paths` to its own folder.
Both keep the dataset roots the inputs record, and add each input's own folder where its rows lie in it, so the
result's paths pass the containment rule wherever it is written (`dataset_roots`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import pandas as pd

from retrieval.data import dataset_roots
from retrieval.data.manifest import SPLITS, assign_splits, is_inside, read_manifest, resolve_image_path
from retrieval.errors import ManifestError, UsageError

ID_COLUMNS: tuple[str, ...] = ("image_id", "study_id", "patient_id")


def absolute_paths(df: pd.DataFrame) -> pd.DataFrame:
    """A copy whose image paths are absolute, resolved against the manifest's folder (``df.attrs["root"]``); its
    dataset roots are the recorded ones, plus that folder when one of the paths lies in it."""
    root = df.attrs.get("root")
    out = df.copy()
    out["image_path"] = [str(resolve_image_path(root, p)) if str(p).strip() else "" for p in out["image_path"]]
    own = [root] if root and any(p and is_inside(root, p) for p in out["image_path"]) else []
    out.attrs[dataset_roots.ATTR] = dataset_roots.union(dataset_roots.recorded_roots(df), own)
    return out


def merge_manifests(paths: Sequence[str | Path], prefix: bool = False) -> pd.DataFrame:
    """The rows of every manifest in `paths`, image paths absolute; ``attrs["notes"]`` says what was done.

    Two manifests that share an image_id are refused (ManifestError naming the id and both files), unless `prefix`:
    then each manifest's image, study and patient ids are prefixed with its file's stem (``covid:img1``). Patients
    that end up in two splits are reported in the notes (`cxr data split` re-splits them)."""
    if len(paths) < 2:
        raise UsageError("merge needs at least two manifests")
    stems = [Path(p).stem for p in paths]
    if prefix and len(set(stems)) < len(stems):
        raise UsageError(f"--prefix needs manifests with different file names, got {', '.join(stems)}")
    frames, seen = [], {}
    for path, stem in zip(paths, stems, strict=True):
        df = absolute_paths(read_manifest(path))
        if prefix:
            for col in ID_COLUMNS:
                df[col] = [f"{stem}:{v}" if v else "" for v in df[col]]
        for image_id in df["image_id"]:
            if image_id in seen:
                raise ManifestError(
                    f"image_id {image_id!r} is in both {seen[image_id]} and {path} "
                    "(pass --prefix to prefix each manifest's ids with its file name)"
                )
            seen[image_id] = str(path)
        frames.append(df)
    merged = pd.concat(frames, ignore_index=True)
    roots = dataset_roots.union(*(dataset_roots.recorded_roots(f) for f in frames))
    notes = [f"{len(merged):,} rows from {len(paths)} manifests"]
    splits = merged[merged["patient_id"] != ""].groupby("patient_id")["split"].nunique()
    mixed = splits[splits > 1]
    if len(mixed):
        notes.append(f"{len(mixed):,} patient(s) are in more than one split (re-split with `cxr data split`)")
    merged.attrs = {"notes": notes, dataset_roots.ATTR: roots}
    return merged


def parse_fractions(text: str) -> dict[str, float]:
    """'train=0.8,val=0.1,test=0.1' -> {'train': 0.8, ...}; a UsageError names what is wrong."""
    out: dict[str, float] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, sep, value = part.partition("=")
        try:
            out[name.strip()] = float(value)
        except ValueError:
            raise UsageError(f"bad split fraction {part!r} (write e.g. 'train=0.8,val=0.1,test=0.1')") from None
        if not sep or name.strip() not in SPLITS:
            raise UsageError(f"bad split fraction {part!r} (split names: {', '.join(SPLITS)})")
    if not out:
        raise UsageError("no split fractions given (write e.g. 'train=0.8,val=0.1,test=0.1')")
    return out


def resplit(df: pd.DataFrame, fractions: Mapping[str, float] | None = None, seed: int = 0) -> pd.DataFrame:
    """A copy with new patient-disjoint splits (seeded); ``attrs["notes"]`` gives the images per split."""
    out = absolute_paths(df)
    try:
        out = assign_splits(out, fractions, seed)
    except ManifestError as e:
        raise UsageError(str(e)) from None
    counts = out["split"].value_counts()
    out.attrs = {
        "notes": [", ".join(f"{s} {counts.get(s, 0):,}" for s in SPLITS) + " images"],
        dataset_roots.ATTR: dataset_roots.recorded_roots(out),
    }
    return out
