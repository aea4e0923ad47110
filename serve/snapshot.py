"""The served index as an immutable snapshot, and the folder signature the watcher compares.

A query takes the current snapshot when it starts and finishes on it; a reload opens a new one beside it and the
service swaps one reference (`service.ServeService.reload`).
"""

from __future__ import annotations

import datetime as _dt
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

TARGETS = ("reports", "images")


@dataclass(frozen=True)
class IndexSnapshot:
    """One opened index; never changed after creation, so a query holding it sees one consistent index."""

    searcher: Any
    signature: tuple
    generation: int
    loaded_at: str
    study_rows: dict[str, np.ndarray]

    def state(self) -> dict:
        """Row and study counts, generation and load time (part of /info and of a reload's answer)."""
        return {
            "count": self.searcher.index.count,
            "studies": len(self.study_rows),
            "generation": self.generation,
            "loaded_at": self.loaded_at,
        }


def folder_signature(path: str | Path) -> tuple:
    """What changes once per commit: the CURRENT pointer's content (generation and info checksum) of an index with
    generations; for an older flat folder, (name, inode, size, mtime) of its visible entries. Hidden entries
    (`.build` work folders, locks) are left out so that an add in progress does not trigger a reload per shard."""
    from index.store import CURRENT_FILE

    try:
        return ("pointer", (Path(path) / CURRENT_FILE).read_bytes())
    except OSError:
        pass
    out = []
    try:
        entries = sorted(os.scandir(path), key=lambda e: e.name)
    except OSError:
        return ()
    for e in entries:
        if e.name.startswith("."):
            continue
        try:
            st = e.stat()
        except OSError:
            continue
        out.append((e.name, st.st_ino, st.st_size, st.st_mtime_ns))
    return tuple(out)


def _now() -> str:
    return _dt.datetime.now(_dt.UTC).replace(microsecond=0).isoformat()


def study_rows(meta: Any) -> dict[str, np.ndarray]:
    """study id -> its row ids in `meta`, in row order."""
    studies = meta["study_id"].astype(str).to_numpy()
    order = np.argsort(studies, kind="stable")
    names, starts = np.unique(studies[order], return_index=True)
    return dict(zip(names.tolist(), np.split(order, starts[1:]), strict=True)) if len(order) else {}


def open_snapshot(path: Path, model: Any, config: Any, generation: int) -> IndexSnapshot:
    """Open the index at `path` with `config`'s search settings (a `ServeConfig`) as snapshot `generation`."""
    from index.search import Searcher

    signature = folder_signature(path)
    c = config
    searcher = Searcher(
        path, model, backend=c.backend, device=c.device, nprobe=c.nprobe, ef_search=c.ef_search,
        one_per_patient=c.one_per_patient,
    )  # fmt: skip
    for target in TARGETS:  # made now, not lazily by two request threads at once
        searcher.backend(target)
    return IndexSnapshot(searcher, signature, generation, _now(), study_rows(searcher.index.meta))
