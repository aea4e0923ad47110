"""`cxr vlm detector --manifest M --out DIR`: train the box detector for `[identify]` / `[ground]` on the boxes."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from cli.options import ALLOW_OUTSIDE, SKIP_BAD_ROWS, THREADS, set_threads


def vlm_detector_cmd(
    manifest: Path = typer.Option(..., "--manifest", "-m", help="Study manifest with boxes and train/val splits."),
    out: Path = typer.Option(..., "--out", "-o", help="Folder to write the detector to."),
    size: int = typer.Option(224, "--size", help="Square input side in pixels (224, 384 or 512)."),
    epochs: int = typer.Option(30, "--epochs", help="Most epochs (early stopping on val mAP@0.5)."),
    trainable_stages: int = typer.Option(
        0, "--trainable-stages", help="Fine-tune the tower's last N stages (0: frozen tower, cached features)."
    ),
    max_minutes: float = typer.Option(None, "--max-minutes", help="Stop after this many minutes (best epoch kept)."),
    seed: int = typer.Option(0, "--seed"),
    threads: int = THREADS,
    allow_outside: bool = ALLOW_OUTSIDE,
    skip_bad_rows: bool = SKIP_BAD_ROWS,
    as_json: bool = typer.Option(False, "--json", help="Print the run summary as JSON."),
) -> None:
    """Train an FCOS detector on the pretrained image tower + FPN from the manifest's boxes."""
    from generation.training.detector_train import DetectorTrainConfig, train_detector
    from retrieval.data.manifest_check import gate_manifest
    from retrieval.errors import UsageError

    if size % 32 or size < 64 or epochs < 1 or trainable_stages < 0:
        raise UsageError("--size must be a multiple of 32 (>= 64), --epochs >= 1, --trainable-stages >= 0")
    set_threads(threads)
    checked = gate_manifest(manifest, allow_outside, skip_bad_rows)
    config = DetectorTrainConfig(size=size, epochs=epochs, trainable_stages=trainable_stages, max_minutes=max_minutes,
                                 seed=seed)  # fmt: skip
    info = train_detector(checked, out, config)
    if as_json:
        print(json.dumps({k: v for k, v in info.items() if k != "history"}, indent=2, default=str))
        return
    print(f"detector -> {out}  ({info['epochs_run']} epochs, {info['seconds']} s; labels: {', '.join(info['labels'])})")
    print(f"best val mAP@0.5 {info['best_val_map50']:.3f}; answer threshold {info['answer_threshold']:.3f}")
    if info["bad_rows"]:
        print(f"{len(info['bad_rows'])} image(s) skipped, e.g. {info['bad_rows'][0]['reason']}")
