"""Options that several commands share, defined once so their defaults and help agree."""

from __future__ import annotations

import typer

# Every command with a device or precision takes these. `retrieval.device.resolve_device` reads "auto" (and a
# library caller's None) as CUDA when present, else CPU.
DEVICE = typer.Option("auto", "--device", help="auto (CUDA when present) | cpu | cuda | cuda:N.")
# `retrieval.device.resolve_precision` reads "auto" as bf16 on CUDA, fp32 on the CPU.
PRECISION = typer.Option("auto", "--precision", help="auto (bf16 on CUDA, fp32 on the CPU) | fp32 | bf16 | fp16.")
# The training commands' (`cxr train`, `cxr vlm train`, `cxr vlm detector`) manifest gate and CPU threads.
ALLOW_OUTSIDE = typer.Option(
    False, "--allow-outside", help="Allow image paths outside the manifest folder (and the dataset folder it records)."
)
SKIP_BAD_ROWS = typer.Option(False, "--skip-bad-rows", help="Skip manifest rows that fail the check.")
THREADS = typer.Option(None, "--threads", help="torch CPU threads (default: torch's choice).")


def set_threads(threads: int | None) -> None:
    """`--threads`: torch's CPU threads, when given (torch imported only then)."""
    if threads:
        import torch

        torch.set_num_threads(threads)
