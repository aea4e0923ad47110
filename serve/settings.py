"""How `cxr serve` is configured: what it loads and the bounds it serves under (`ServeConfig`)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

MAX_PIXELS = 36_000_000  # 6000 x 6000: above any chest detector; checked from the header
MAX_DECODE_MB = 1024.0  # memory one upload's decode may need (estimated from its header)
MAX_DECODES = 2  # uploads decoded at once (the others wait)


def default_workers() -> int:
    """Worker threads: one per core this process may use."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


@dataclass
class ServeConfig:
    """What `cxr serve` loads and how it serves (see `cxr serve --help` for each option)."""

    index: Path
    model: str | None = None  # default: the model folder recorded in the index's index_info.json
    vlm: Path | None = None
    device: str = "auto"  # retrieval.device.resolve_device: CUDA when present
    backend: str = "auto"
    nprobe: int | None = None
    ef_search: int | None = None
    workers: int = field(default_factory=default_workers)
    max_batch: int = 32  # 1 = no batching
    max_wait_ms: float = 0.0
    watch_interval: float = 2.0  # seconds between checks of the index folder; 0 = only POST /reload
    max_upload_mb: float = 50.0
    max_pixels: int = MAX_PIXELS
    max_decode_mb: float = MAX_DECODE_MB
    max_decodes: int = MAX_DECODES
    show_paths: bool = False  # reveal the server's paths (index, image files, errors) in responses
    max_k: int = 1000
    thumbnail_cache: int = 512
    archive_url: str | None = None  # a link template to the archive's viewer (serve/archive_link.py)
