"""`cxr train`: fine-tune a model's projector (and optionally towers) with the CLIP + SupCon + BCE loss."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from cli.options import ALLOW_OUTSIDE, DEVICE, PRECISION, SKIP_BAD_ROWS

MODEL_HELP = (
    "cxr-small (offline default) | biomedclip (with the hub) | cxr-tiny | timm:NAME | hf:ORG/NAME | local-dir:PATH "
    "| a saved folder."
)
AUGMENT_HELP = (
    "Radiograph augmentation of the training images: small rotations and crops, contrast and gamma, never a "
    "left-right flip (the image tower then runs every epoch)."
)
MONITOR_HELP = (
    "Val metric to early-stop on: auto (label mAP, or exact-study mAP where the val labels are nearly uniform and "
    "label mAP cannot move) | i2r_map_label | i2r_map_exact."
)


def train_cmd(
    manifest: Path = typer.Option(..., "--manifest", "-m", help="Study manifest (Parquet or CSV) with splits."),
    model: str = typer.Option("cxr-small", "--model", help=MODEL_HELP),
    out: Path = typer.Option(..., "--out", "-o", help="Output folder: the trained model, checkpoints, cache."),
    epochs: int = typer.Option(8, "--epochs", help="Maximum epochs (early stopping on val mAP may end sooner)."),
    batch_size: int = typer.Option(64, "--batch-size", help="Studies per batch."),
    lr: float = typer.Option(1e-3, "--lr", help="Learning rate of projectors and head."),
    loss_weights: str = typer.Option("1,1,1", "--loss-weights", help="Weights clip,supcon,bce (0 = off)."),
    positive_rule: str = typer.Option(
        None, "--positive-rule", help="SupCon positives: same-set | binary | overlap (default: binary)."
    ),
    unfreeze_last: int = typer.Option(0, "--unfreeze-last", help="Unfreeze the last N blocks of each tower."),
    unfreeze_towers: str = typer.Option(
        "image,text", "--unfreeze-towers", help="The towers --unfreeze-last applies to: image,text | image | text."
    ),
    augment: bool = typer.Option(False, "--augment", help=AUGMENT_HELP),
    image_tower: str = typer.Option(
        "auto", "--image-tower", help="auto (cxr-tiny trains it from scratch) | train | frozen."
    ),
    max_train_studies: int = typer.Option(None, "--max-train-studies", help="Train on the first N studies."),
    cache_dir: Path = typer.Option(None, "--cache-dir", help="Frozen-feature cache (default OUT/feature_cache)."),
    token_cache: Path = typer.Option(
        None,
        "--token-cache",
        help="Also keep a frozen CNN tower's grid tokens here, for `cxr vlm train --token-cache`.",
    ),
    patience: int = typer.Option(3, "--patience", help="Early-stop after N epochs without val improvement."),
    monitor: str = typer.Option("auto", "--monitor", help=MONITOR_HELP),
    seed: int = typer.Option(0, "--seed", help="Random seed (the run is deterministic for a seed)."),
    device: str = DEVICE,
    precision: str = PRECISION,
    no_cache: bool = typer.Option(False, "--no-cache", help="Re-run frozen towers every epoch (slow)."),
    fresh: bool = typer.Option(False, "--fresh", help="Ignore an existing checkpoint in --out and start over."),
    allow_outside: bool = ALLOW_OUTSIDE,
    skip_bad_rows: bool = SKIP_BAD_ROWS,
    as_json: bool = typer.Option(False, "--json", help="Print the training summary as JSON."),
) -> None:
    """Train on the manifest's train split, validate on val each epoch, save the best model to --out.

    Re-running the same command after an interruption resumes from the last checkpoint."""
    from retrieval.data.manifest_check import gate_manifest
    from retrieval.errors import UsageError
    from retrieval.losses import DEFAULT_POSITIVE_RULE, parse_loss_weights
    from retrieval.training import TrainConfig, train

    try:
        weights = parse_loss_weights(loss_weights)
    except ValueError as e:
        raise UsageError(str(e)) from None
    config = TrainConfig(
        epochs=epochs,
        batch_size=batch_size,
        lr=lr,
        loss_weights=weights,
        positive_rule=positive_rule or DEFAULT_POSITIVE_RULE,
        unfreeze_last=unfreeze_last,
        image_tower=image_tower,
        max_train_studies=max_train_studies,
        cache_dir=None if cache_dir is None else str(cache_dir),
        token_cache=None if token_cache is None else str(token_cache),
        patience=patience,
        monitor=monitor,
        augment=augment,
        unfreeze_towers=tuple(t.strip() for t in unfreeze_towers.split(",") if t.strip()),
        seed=seed,
        device=None if device == "auto" else device,
        precision=precision,
        feature_cache=not no_cache,
        show_progress=not as_json,
    )
    info = train(gate_manifest(manifest, allow_outside, skip_bad_rows), model, out, config, fresh=fresh).info
    if as_json:
        print(json.dumps(info, indent=2, default=str))
        return
    _print_summary(info, model, out)


def _print_summary(info: dict, model: str, out: Path) -> None:
    """The epoch table (best epoch starred) and a one-line summary."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"cxr train: {model} -> {out}")
    keys = [k for k in info["history"][0] if k != "epoch"] if info["history"] else []
    table.add_column("epoch", justify="right")
    for k in keys:
        table.add_column(k, justify="right")
    for row in info["history"]:
        mark = " *" if row["epoch"] == info["best_epoch"] else ""
        table.add_row(f"{row['epoch']}{mark}", *(f"{row[k]:.4f}" if k in row else "" for k in keys))
    console = Console()
    console.print(table)
    console.print(
        f"best epoch {info['best_epoch']} ({info['monitor']} {info['best_metric']}); "
        f"towers: {info['towers']}; {info['train_studies']} train studies, {info['val_images']} val images; "
        f"{len(info['skipped'])} skipped; total {info['timings']['total_s']:.1f}s; saved to {out}"
    )
