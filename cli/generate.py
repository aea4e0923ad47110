"""`cxr generate IMAGE --index IDX --vlm DIR`: a report (or answer, diagnoses, boxes) for one radiograph."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from cli.options import DEVICE


def generate_cmd(
    image: Path = typer.Argument(..., help="A radiograph: PNG, JPEG or DICOM."),
    vlm: Path = typer.Option(..., "--vlm", help="A VLM folder written by `cxr vlm train`."),
    index: Path = typer.Option(None, "--index", help="Index folder to retrieve exemplar reports from."),
    task: str = typer.Option("report", "--task", help="report | vqa | classify | identify | ground."),
    question: str = typer.Option(None, "--question", help="The question for --task vqa."),
    phrase: str = typer.Option(None, "--phrase", help="The anatomy or finding for --task ground."),
    k: int = typer.Option(3, "-k", help="Exemplar reports in the prompt (0 = no retrieval)."),
    report_source: str = typer.Option(
        "findings",
        "--report-source",
        help="[report]: findings (the template writer), generate (the LM writes it from the findings + exemplars), "
        "quote (the best exemplar).",
    ),
    as_json: bool = typer.Option(False, "--json", help="Print the result as JSON."),
    device: str = DEVICE,
) -> None:
    """Generate for one image; the output names the exemplar studies the prompt carried."""
    from cli.quiet import quiet_transformers
    from generation.generate import generate_for_image
    from retrieval.errors import UsageError

    quiet_transformers()
    if k < 0:
        raise UsageError("-k must be >= 0")
    if k > 0 and index is None:
        raise UsageError("retrieval needs --index (or pass -k 0)")
    res = generate_for_image(
        image, index, vlm, task=task, k=k, question=question, phrase=phrase, device=device, report_source=report_source
    )
    if as_json:
        print(json.dumps(res, indent=2))
        return
    from rich.console import Console
    from rich.markup import escape

    c = Console()
    c.print(f"[bold]{escape('[' + res['task'] + ']')}[/bold] {escape(res['prompt'])}")
    c.print(escape(res["text"]) if res["text"] else "[dim](empty)[/dim]")
    for b in res.get("boxes", []):
        c.print(f"  box {b['label'] or '-'}: x1={b['x1']:.2f} y1={b['y1']:.2f} x2={b['x2']:.2f} y2={b['y2']:.2f}")
    if res["exemplars"]:
        c.print("exemplars: " + ", ".join(f"{e['study_id']} ({e['score']:.3f})" for e in res["exemplars"]))
    else:
        c.print("[dim]no exemplars (retrieval off)[/dim]")
