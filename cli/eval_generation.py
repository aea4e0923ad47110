"""`cxr eval generation --vlm DIR --index IDX --manifest M --split test`: every task with its baselines."""

from __future__ import annotations

import json
from pathlib import Path

import typer


def eval_generation_cmd(
    vlm: Path = typer.Option(..., "--vlm", help="A VLM folder written by `cxr vlm train`."),
    manifest: Path = typer.Option(..., "--manifest", "-m", help="Study manifest with splits."),
    index: Path = typer.Option(None, "--index", help="Index folder for exemplars and the retrieval baseline."),
    split: str = typer.Option("test", "--split", help="Split to evaluate."),
    k: int = typer.Option(3, "-k", help="Exemplar reports for the RAG condition."),
    tasks: str = typer.Option(None, "--tasks", help="Comma-separated tasks (default: those the VLM learned)."),
    max_per_task: int = typer.Option(300, "--max-per-task", help="Examples per task (sampled; 0 = all)."),
    retrieval_target: str = typer.Option(
        "reports", "--retrieval-target", help="reports (image->report) | images (image->image, sets without text)."
    ),
    no_meteor: bool = typer.Option(False, "--no-meteor", help="Skip METEOR (it starts Java)."),
    metrics: str = typer.Option(
        "default",
        "--metrics",
        help="Report metrics: default (BLEU-1..4, METEOR, ROUGE-L, CIDEr, labeler F1; offline) plus any of chexbert "
        "(CheXbert-label F1: micro/macro over 14 and 5 labels), radgraph (RadGraph-XL F1: simple/partial/complete): "
        "pip install 'cxr-retrieval[metrics]'. ReXrank's BLEU = bleu2.",
    ),
    metrics_dir: Path = typer.Option(
        None, "--metrics-dir", help="Folder holding chexbert/ and radgraph/ from `cxr models prefetch NAME --to`."
    ),
    report_source: str = typer.Option(
        "findings", "--report-source", help="[report]: findings (the template writer), generate (the LM), quote."
    ),
    vqa_source: str = typer.Option("head", "--vqa-source", help="Closed [vqa]: head (finding head) or lm."),
    image: str = typer.Option(
        "real", "--image", help="real, or a control that replaces every test image: blank, noise, other (a study's)."
    ),
    shuffled: bool = typer.Option(False, "--shuffled", help="Add the VLM's answers shuffled between test images."),
    out: Path = typer.Option(None, "--out", "-o", help="Also write the results: OUT.json and OUT.md."),
    allow_outside: bool = typer.Option(
        False, "--allow-outside", help="Allow image paths outside the manifest's folder (symlinks resolved)."
    ),
    as_json: bool = typer.Option(False, "--json", help="Print the results as JSON."),
) -> None:
    """BLEU/METEOR/ROUGE-L/CIDEr, clinical efficacy, VQA, classification, localisation and grounding metrics,
    with constant, retrieval-only, no-RAG and RAG rows in one table per task."""
    from generation.data.image_controls import IMAGE_CONTROLS
    from generation.evaluation.evaluate_generation import evaluate_generation
    from generation.evaluation.metrics import BLEU_NOTE
    from generation.evaluation.results_table import results_markdown
    from generation.writing.generator_options import GeneratorOptions
    from retrieval.errors import UsageError

    if image not in IMAGE_CONTROLS:
        raise UsageError(f"--image must be one of {', '.join(IMAGE_CONTROLS)}, got {image!r}")
    from generation.evaluation.report_metrics import check_report_metrics, parse_metrics, use_report_metrics
    from retrieval.data.manifest_check import require_inside
    from retrieval.fileio import atomic_path, write_json_atomic


    extra = parse_metrics(metrics)
    check_report_metrics(extra, metrics_dir)  # a missing library or weight: one line naming the fix, before any work
    require_inside(manifest, allow_outside)  # the containment rule, before any model loads
    with use_report_metrics(extra, metrics_dir):
        res = evaluate_generation(
            vlm,
            manifest,
            index,
            split=split,
            k=k,
            tasks=[t.strip() for t in tasks.split(",")] if tasks else None,
            max_per_task=max_per_task or None,
            meteor=not no_meteor,
            retrieval_target=retrieval_target,
            options=GeneratorOptions(report_source=report_source, vqa_source=vqa_source),
            image_control=image,
            shuffled=shuffled,
        )
    res["bleu"] = BLEU_NOTE
    md = results_markdown(res) + f"\n{BLEU_NOTE}\n"
    if out is not None:
        write_json_atomic(out.with_suffix(".json"), res)
        with atomic_path(out.with_suffix(".md")) as tmp:
            tmp.write_text(md)
    if as_json:
        print(json.dumps(res, indent=2, default=str))
    else:
        print(md)
