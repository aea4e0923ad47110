"""`cxr eval retrieval`: retrieval quality on a manifest split, beside zero-shot and random baselines."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from cli.options import DEVICE, PRECISION


def eval_retrieval_cmd(
    model: str = typer.Option(..., "--model", help="A trained model folder (or a model name)."),
    manifest: Path = typer.Option(..., "--manifest", "-m", help="Study manifest (Parquet or CSV)."),
    split: str = typer.Option("test", "--split", help="Split to evaluate (train | val | test | all)."),
    batch_size: int = typer.Option(32, "--batch-size", help="Encoding batch size."),
    device: str = DEVICE,
    precision: str = PRECISION,
    seed: int = typer.Option(0, "--seed", help="Seed of the zero-shot projector and the random baseline."),
    no_baselines: bool = typer.Option(False, "--no-baselines", help="Skip the zero-shot and random rows."),
    plot: Path = typer.Option(None, "--plot", help="Write a 2-D map of the image embeddings to this PNG."),
    allow_outside: bool = typer.Option(
        False, "--allow-outside", help="Allow image paths outside the manifest's folder (symlinks resolved)."
    ),
    as_json: bool = typer.Option(False, "--json", help="Print the full result (all metrics, per label) as JSON."),
) -> None:
    """Recall@1/5/10, MRR, exact and label mAP, label precision@K for image->report, report->image and
    image->image (own patient excluded), next to the untrained-projector and random baselines."""
    from retrieval.data.manifest_check import require_inside
    from retrieval.device import resolve_device
    from retrieval.evaluate_retrieval import evaluate_retrieval, format_per_label, format_table
    from retrieval.models import load_model

    require_inside(manifest, allow_outside)  # the containment rule, before the model loads

    dev = resolve_device(device)
    loaded = load_model(model, device=dev)
    result = evaluate_retrieval(
        loaded,
        manifest,
        split=None if split == "all" else split,
        batch_size=batch_size,
        device=str(dev),
        precision=precision,
        baselines=not no_baselines,
        seed=seed,
        show_progress_bar=not as_json,
        plot=plot,
    )
    if as_json:
        print(json.dumps(result, indent=2, default=str))
        return
    print(
        f"model {result['model']} ({result['fingerprint'][:12]}), split {split}: {result['images']} images, "
        f"{result['studies']} studies, {result['patients']} patients, {result['abnormal_images']} abnormal; "
        f"{len(result['skipped'])} skipped"
    )
    if result["labelled_by_labeler"]:
        print(
            f"note: {result['labelled_by_labeler']} of {result['images']} images had no labels in the manifest; "
            "their labels were read from the report text by the rule labeler"
        )
    print(format_table(result))
    print("\nper label, image->report (model):")
    print(format_per_label(result))
    for line in result["skipped"][:5]:
        print(f"skipped: {line}")
    if result.get("plot"):
        print(f"plot: {result['plot']}")
