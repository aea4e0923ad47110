"""Device and precision choices shared by encoding, training, indexing and generation."""

from __future__ import annotations

import contextlib

import torch

from retrieval.errors import UsageError

PRECISIONS = ("fp32", "bf16", "fp16")


def resolve_device(device: str | torch.device | None = None) -> torch.device:
    """`None`/'auto' picks CUDA when torch sees it, else CPU; a name torch does not know is a `UsageError`."""
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        return torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise UsageError(f"unknown device {device!r}: use auto, cpu, cuda or cuda:N") from e


def autocast(device: torch.device, precision: str = "fp32") -> contextlib.AbstractContextManager:
    """Autocast context for `precision` (fp32: none). bf16 on CPU and CUDA; fp16 on CUDA only."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if precision == "fp32":
        return contextlib.nullcontext()
    if precision == "fp16" and device.type != "cuda":
        raise ValueError("fp16 autocast needs a CUDA device; use bf16 on the CPU")
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


def resolve_precision(precision: str | None, device: torch.device) -> str:
    """The one precision policy: "auto"/None = bf16 autocast on CUDA (fast, accurate enough for retrieval and
    tokens), fp32 elsewhere (this project's CPUs run bf16 7.5x slower); an explicit choice is kept as it is."""
    if precision is None or precision == "auto":
        return "bf16" if device.type == "cuda" else "fp32"
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be auto or one of {PRECISIONS}, got {precision!r}")
    return precision
