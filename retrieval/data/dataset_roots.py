"""The dataset folders a manifest records: where its importer found the images, so that paths under them pass the
containment rule without `--allow-outside`.

An importer reads a dataset folder and writes a manifest somewhere else; its image paths then point into that
folder. The folder (or folders, after `cxr data merge`) travels in the Parquet file's key-value metadata under
`METADATA_KEY` as a JSON list of absolute paths, and in memory in ``df.attrs[ATTR]``. A path may lie in the
manifest's own folder or under one of these roots; anywhere else it is outside (`manifest.resolve_image_path`).
A CSV manifest has no metadata: it records no root.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from retrieval.errors import ManifestError

METADATA_KEY = b"cxr.dataset_root"
ATTR = "dataset_roots"


def recorded_roots(df_or_attrs: Any) -> list[str]:
    """The dataset roots a manifest (its DataFrame, or its ``attrs``) records, in order; [] when none."""
    attrs = df_or_attrs if isinstance(df_or_attrs, Mapping) else getattr(df_or_attrs, "attrs", {})
    return [str(r) for r in attrs.get(ATTR) or []]


def union(*groups: Iterable[str]) -> list[str]:
    """The roots of every group, first appearance first, each once."""
    out: list[str] = []
    for group in groups:
        out += [str(r) for r in group if str(r) not in out]
    return out


def from_metadata(metadata: Mapping[bytes, bytes] | None, where: str | Path) -> list[str]:
    """The roots in a Parquet schema's key-value metadata; a value that is not a JSON list of absolute paths is a
    ManifestError naming the file."""
    raw = (metadata or {}).get(METADATA_KEY)
    if raw is None:
        return []
    try:
        roots = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        roots = None
    if not isinstance(roots, list) or not all(isinstance(r, str) and os.path.isabs(r) for r in roots):
        raise ManifestError(f"{where}: metadata {METADATA_KEY.decode()} is not a JSON list of absolute folders")
    if any(os.path.dirname(os.path.normpath(r)) == os.path.normpath(r) for r in roots):
        raise ManifestError(f"{where}: metadata {METADATA_KEY.decode()} names the file system's root, which would "
                            "let every path in")  # fmt: skip
    return roots


def to_metadata(roots: Sequence[str]) -> dict[bytes, bytes]:
    """The key-value metadata that records `roots` ({} for none)."""
    return {METADATA_KEY: json.dumps(list(roots)).encode("utf-8")} if roots else {}


def missing_root(roots: Iterable[str]) -> str | None:
    """Why the first of `roots` that is not a folder cannot be used (the dataset moved, or the manifest came from
    another machine); None when every one is a folder."""
    for root in roots:
        if not os.path.isdir(root):
            return (
                f"the dataset root {root!r} this manifest records does not exist (moved? import the dataset "
                "again, or pass --allow-outside)"
            )
    return None


def existing_roots(df: Any) -> list[str]:
    """The recorded roots of a manifest, each a folder; else a ManifestError in one line naming the manifest, the
    root and the way out."""
    roots = recorded_roots(df)
    reason = missing_root(roots)
    if reason:
        raise ManifestError(f"{getattr(df, 'attrs', {}).get('path') or 'manifest'}: {reason}")
    return roots


def image_roots(paths: Iterable[str], declared: Iterable[str | Path | None]) -> list[str]:
    """The roots to record for an import: each `declared` folder (what the importer read: the dataset folder, its
    image folder, a cache) that holds one of the image `paths`, then, for images in none of them, the folder they
    all share (never the file system's root). Absolute real paths."""
    folders = [os.path.realpath(d) for d in declared if d is not None and str(d) and os.path.isdir(d)]
    used: list[str] = []
    rest: set[str] = set()
    real_dirs: dict[str, str] = {}  # a dataset's images share few folders: resolve each folder once
    for path in paths:
        if not str(path).strip():
            continue
        parent = os.path.dirname(os.path.abspath(path))
        if parent not in real_dirs:
            real_dirs[parent] = os.path.realpath(parent)
        real = real_dirs[parent]
        folder = next((d for d in folders if os.path.commonpath([d, real]) == d), None)
        if folder is None:
            rest.add(real)
        elif folder not in used:
            used.append(folder)
    if rest:
        shared = os.path.commonpath(sorted(rest))
        if os.path.dirname(shared) != shared:  # '/' (or a drive's root) would let every path in
            used.append(shared)
    return used


def holding(roots: Iterable[str], real_paths: Iterable[str]) -> list[str]:
    """The `roots` that hold at least one of `real_paths` (absolute, symlinks already resolved): what a manifest
    needs to record once its other paths are relative to its own folder."""
    real_roots = {root: os.path.realpath(root) for root in roots}
    held: set[str] = set()
    for path in real_paths:
        held.update(r for r, real in real_roots.items() if r not in held and os.path.commonpath([real, path]) == real)
        if len(held) == len(real_roots):
            break
    return [r for r in real_roots if r in held]
