"""`cxr index sync URL --index IDX`: add to an index the radiographs of a DICOMweb archive it does not hold yet.

Each sync runs the DICOMweb import (QIDO-RS search, WADO-RS fetch of what the cache lacks: importers/dicomweb.py)
and keeps the rows whose SOP Instance UID (the image_id of a DICOM row) is neither in the index nor in its list of
images that could not be read; those are appended with `index.build.add_to_index` as one new generation. Run
twice with nothing new in the archive, it adds nothing (and commits nothing). The state kept with the index,
`IDX/dicomweb_sync.json`, records the archive's URL, the cache folder and every sync (when, found, added); never
a credential or a key. The index holds the truth of what was added: a sync killed before its commit is simply
done again by the next one (the fetched files stay in the cache).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from index import store
from index.build import BuildOptions, BuildResult, add_to_index
from index.layout import now_iso
from retrieval.data.importers.dicomweb import import_dicomweb
from retrieval.fileio import write_json_atomic

log = logging.getLogger(__name__)
SYNC_FILE = "dicomweb_sync.json"
KEEP_SYNCS = 50  # the last syncs recorded in the state file


@dataclass
class SyncResult:
    """What a sync did: instances found in the archive, new ones added, and the add's own result (None when
    nothing was new)."""

    index_dir: Path
    found: int
    new: int
    added: int
    problems: list[str]
    build: BuildResult | None

    def as_dict(self) -> dict:
        out = {"index": str(self.index_dir), "found": self.found, "new": self.new, "added": self.added,
               "problems": self.problems}  # fmt: skip
        if self.build is not None:
            out["add"] = self.build.as_dict()
        return out


def read_state(index_dir: str | Path) -> dict:
    """The sync state kept with the index ({} before the first sync)."""
    import json

    path = Path(index_dir) / SYNC_FILE
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except ValueError:
        log.warning("%s: unreadable sync state, starting a new one (the index itself says what it holds)", path)
        return {}


def _write_state(index_dir: Path, url: str, cache: Path, found: int, added: int) -> None:
    state = read_state(index_dir)
    syncs = list(state.get("syncs", []))[-(KEEP_SYNCS - 1) :] + [{"at": now_iso(), "found": found, "added": added}]
    write_json_atomic(index_dir / SYNC_FILE, {"url": url, "cache": str(cache), "syncs": syncs})


def held_ids(index_dir: Path) -> set[str]:
    """image_ids the index holds, and those it could not read before (not retried by every sync)."""
    current = store.open_index(index_dir, None, full=False)
    ids = set(current.meta["image_id"].astype(str))
    bad = store.read_bad(index_dir)
    if len(bad):
        ids |= set(bad["image_id"].astype(str))
    return ids


def sync_index(
    url: str,
    index_dir: str | Path,
    model: Any = None,
    cache: str | Path | None = None,
    options: BuildOptions | None = None,
    import_options: Mapping[str, Any] | None = None,
    load_model: Callable[[], Any] | None = None,
) -> SyncResult:
    """Fetch what is new in the archive at `url` and append it to the index at `index_dir` (see the module doc).
    `import_options` go to `import_dicomweb` (auth, since/until, filters, workers, pseudonymize, reports). Give
    the `model`, or `load_model` to load it only when there is something new (a sync with nothing new then costs
    no model load)."""
    if model is None and load_model is None:
        raise ValueError("sync_index needs a model or a load_model callable")
    index_dir = Path(index_dir)
    store.read_info(index_dir)  # a missing index is an error before anything is fetched
    state = read_state(index_dir)
    cache = Path(cache or state.get("cache") or index_dir.resolve().parent / "dicom-cache")
    df = import_dicomweb(url, cache=cache, **dict(import_options or {}))
    problems = list(df.attrs.get("import_problems", []))
    new = df[~df["image_id"].astype(str).isin(held_ids(index_dir))].reset_index(drop=True)
    log.info("dicomweb sync: %d radiograph(s) in the archive, %d new to the index", len(df), len(new))
    build = None
    if len(new):
        opts = options or BuildOptions()
        opts.allow_outside = True  # the rows' files live in the cache, outside any manifest folder
        build = add_to_index(index_dir, new, model if model is not None else load_model(), options=opts)
    added = build.added if build is not None else 0
    _write_state(index_dir, url, cache, len(df), added)
    return SyncResult(index_dir, len(df), len(new), added, problems, build)
