"""Options that several commands share, defined once so their defaults and help agree."""

from __future__ import annotations

import typer

# Every command with a device or precision takes these. `retrieval.device.resolve_device` reads "auto" (and a
# library caller's None) as CUDA when present, else CPU.
DEVICE = typer.Option("auto", "--device", help="auto (CUDA when present) | cpu | cuda | cuda:N.")
# `retrieval.device.resolve_precision` reads "auto" as bf16 on CUDA, fp32 on the CPU.
PRECISION = typer.Option("auto", "--precision", help="auto (bf16 on CUDA, fp32 on the CPU) | fp32 | bf16 | fp16.")
