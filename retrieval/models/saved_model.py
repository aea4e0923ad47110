"""Saved-model folder: safetensors weights, JSON configs, the weights fingerprint, and strict loading.

Folder layout (`CXRModel.save`):
  open_clip_config.json        {"model_cfg", "preprocess_cfg"} in open_clip's format
  open_clip_model.safetensors  both towers (the open_clip model's state dict)
  projector.json, projector.safetensors   the projector heads and the abnormality head
  text/                        the HF text tower's config.json and tokenizer files (HF text towers only)
  model_info.json              name, embed_dim, fingerprint, versions, created (written last)
No pickle anywhere; weights that do not match the architecture raise ModelLoadError naming the file.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from retrieval.errors import ModelLoadError
from retrieval.fileio import atomic_path

TOWERS_FILE = "open_clip_model.safetensors"
PROJECTOR_FILE = "projector.safetensors"


def fingerprint_state(state: Mapping[str, torch.Tensor]) -> str:
    """sha256 over every tensor's name, dtype, shape and bytes, in sorted name order."""
    h = hashlib.sha256()
    for name in sorted(state):
        t = state[name].detach()
        h.update(name.encode())
        h.update(str(t.dtype).encode())
        h.update(str(tuple(t.shape)).encode())
        flat = t.cpu().contiguous().reshape(-1)
        h.update(flat.view(torch.uint8).numpy().tobytes() if flat.numel() else b"")
    return h.hexdigest()


def save_safetensors(module: nn.Module, path: Path) -> None:
    """Write a module's state dict as safetensors, atomically (tensors cloned contiguous: no shared storage)."""
    from safetensors.torch import save_file

    state = {k: v.detach().cpu().contiguous().clone() for k, v in module.state_dict().items()}
    with atomic_path(path) as tmp:
        save_file(state, str(tmp), metadata={"format": "pt"})


def _example(keys: list[str], n: int = 3) -> str:
    more = f" (+{len(keys) - n} more)" if len(keys) > n else ""
    return ", ".join(keys[:n]) + more


def load_safetensors_strict(module: nn.Module, path: Path) -> None:
    """Load `path` into `module`: every key present, none extra, every shape equal, else ModelLoadError."""
    from safetensors.torch import load_file

    if not path.is_file():
        raise ModelLoadError(f"{path}: weights file missing")
    try:
        state = load_file(str(path), device="cpu")
    except Exception as e:  # SafetensorError, OSError, ...
        raise ModelLoadError(f"{path}: unreadable safetensors file ({type(e).__name__}: {e})") from None
    expected = module.state_dict()
    missing = sorted(set(expected) - set(state))
    extra = sorted(set(state) - set(expected))
    bad_shape = [
        f"{k} {tuple(state[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in sorted(set(state) & set(expected))
        if tuple(state[k].shape) != tuple(expected[k].shape)
    ]
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing keys: {_example(missing)}")
    if extra:
        problems.append(f"{len(extra)} unexpected keys: {_example(extra)}")
    if bad_shape:
        problems.append(f"{len(bad_shape)} shape mismatches: {_example(bad_shape, 2)}")
    if problems:
        raise ModelLoadError(f"{path}: weights do not match the model ({'; '.join(problems)})")
    module.load_state_dict(state, strict=True)
