"""Frozen visual tokens on disk, once per corpus: what the VLM reads, kept so that no tower runs twice on an image.

One safetensors file per (image-tower weights, grid) in a cache folder, `tokens-<key>.safetensors`, with a JSON list
beside it naming each row by image path, size and mtime (a changed file is a new row). Rows are only appended, and
both files are replaced atomically; the tokens file records a sha256 of its tokens and of the key list, and a
corrupt, mismatched or unchecksummed pair is recomputed with a warning, never trusted.

Two writers fill it: the VLM's visual-token pass (`generation.data.features`), and the retrieval trainer's
frozen-feature pass over a CNN tower, which computes the last feature map anyway (its pooled features are that
map's mean) and so keeps the tokens for a later VLM run at no extra forward pass.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path

import torch

log = logging.getLogger(__name__)
DEFAULT_GRID = 8  # the VLM's default visual grid (tokens are pooled to grid x grid at most)


def image_key(path: str | Path) -> str:
    """How a row is named: the image's path, size and mtime."""
    try:
        st = os.stat(path)
        return f"{path}|{st.st_size}|{st.st_mtime_ns}"
    except OSError:
        return f"{path}|missing"


def _content_sha(tokens: torch.Tensor, raw_names: bytes) -> str:
    h = hashlib.sha256(raw_names)
    h.update(tokens.contiguous().view(torch.uint8).numpy().tobytes() if tokens.numel() else b"")
    return h.hexdigest()


class TokenCache:
    """The cache file of one frozen image tower (by its weights hash) at one grid, in `folder`."""

    def __init__(self, folder: str | Path, tower_hash: str, grid: int | None):
        key = hashlib.sha256(f"{tower_hash}|{grid}".encode()).hexdigest()[:20]
        self.file = Path(folder) / f"tokens-{key}.safetensors"
        self.names_file = self.file.with_suffix(".json")
        self._names: list[str] | None = None
        self._store: torch.Tensor | None = None

    def _load(self) -> None:
        from safetensors.torch import load_file

        if self._names is not None:
            return
        self._names, self._store = [], None
        if not self.file.is_file():
            return
        from safetensors import safe_open

        try:
            raw_names = self.names_file.read_bytes()
            names = json.loads(raw_names)
            with safe_open(str(self.file), framework="pt") as f:
                want = (f.metadata() or {}).get("content_sha256")
            store = load_file(str(self.file))["tokens"]
            if store.shape[0] != len(names):
                raise ValueError("row count differs from the key list")
            if want != _content_sha(store, raw_names):
                raise ValueError("checksum mismatch" if want else "no checksum (written by an earlier release)")
            self._names, self._store = names, store
        except Exception as e:  # a corrupt cache is recomputed, never trusted
            log.warning("%s: unreadable token cache (%s); recomputing", self.file, e)

    def get(self, paths: Sequence[str | Path]) -> dict[int, torch.Tensor]:
        """{position in `paths`: (N, D) float16 tokens} for the images the cache holds."""
        self._load()
        where = {n: i for i, n in enumerate(self._names or [])}
        found = {j: where.get(image_key(p)) for j, p in enumerate(paths)}
        return {j: self._store[i] for j, i in found.items() if i is not None and self._store is not None}

    def add(self, paths: Sequence[str | Path], tokens: torch.Tensor) -> None:
        """Append the (len(paths), N, D) tokens of images not yet held (stored as float16)."""
        from safetensors.torch import save_file

        self._load()
        names = list(self._names or [])
        held = set(names)
        keys = [image_key(p) for p in paths]
        new = [j for j, k in enumerate(keys) if k not in held and not k.endswith("|missing")]
        new = list({keys[j]: j for j in new}.values())  # one row per image, even if a path repeats
        if not new:
            return
        rows = tokens[torch.as_tensor(new, dtype=torch.long)].to(torch.float16)
        if self._store is not None and tuple(self._store.shape[1:]) != tuple(rows.shape[1:]):
            raise ValueError(f"{self.file}: tokens of shape {tuple(rows.shape[1:])} do not match the cache's")
        store = rows if self._store is None else torch.cat([self._store, rows])
        names += [keys[j] for j in new]
        self.file.parent.mkdir(parents=True, exist_ok=True)
        tmp, tmp_names = self.file.with_name(self.file.name + ".tmp"), self.names_file.with_suffix(".json.tmp")
        raw_names = json.dumps(names).encode()
        store = store.contiguous()
        save_file({"tokens": store}, str(tmp), metadata={"content_sha256": _content_sha(store, raw_names)})
        tmp_names.write_bytes(raw_names)
        os.replace(tmp, self.file)
        os.replace(tmp_names, self.names_file)
        self._names, self._store = names, store
        log.info("visual tokens: %d added to %s (%d rows)", len(new), self.file, len(names))
