"""`cxr data demo`: render the embedded demo corpus (one synthetic radiograph per IU X-ray report)."""

from __future__ import annotations

import json
from pathlib import Path

import typer


def demo_data_cmd(
    out: Path = typer.Option(..., "--out", help="Folder for images/, manifest.parquet and demo_info.json."),
    size: int = typer.Option(256, "--size", help="Image side in pixels."),
    seed: int = typer.Option(0, "--seed", help="Seed for anatomy, findings' placement, noise and splits."),
    limit: int | None = typer.Option(None, "--limit", help="Render only the first N reports."),
    workers: int = typer.Option(2, "--workers", help="Worker processes."),
    contact_sheet: Path | None = typer.Option(
        None, "--contact-sheet", help="Also save a PNG grid of 16 studies with their finding boxes."
    ),
    as_json: bool = typer.Option(False, "--json", help="Print the summary as JSON."),
) -> None:
    """Render synthetic chest radiographs for the IU X-ray reports (a demo and test bed, not clinical data).

    Returns at once when OUT already holds a complete corpus for the same size, seed and limit."""
    from retrieval.data.demo import build_demo_corpus
    from retrieval.data.manifest_check import summarize_manifest

    df = build_demo_corpus(out, size=size, seed=seed, limit=limit, workers=workers, show_progress=not as_json)
    summary = summarize_manifest(df)
    summary["unrendered"] = int(df["unrendered"].map(len).astype(bool).sum()) if "unrendered" in df else 0
    summary["cached"] = bool(df.attrs.get("cached", False))
    summary["seconds"] = round(float(df.attrs.get("seconds", 0.0)), 1)
    summary["manifest"] = str(Path(out) / "manifest.parquet")
    if contact_sheet is not None:
        from retrieval.data.contact_sheet import contact_sheet as make_sheet

        summary["contact_sheet"] = str(make_sheet(df, contact_sheet))
    if as_json:
        print(json.dumps(summary, indent=2, default=str))
        return
    from rich.console import Console
    from rich.table import Table

    console = Console()
    state = "cached corpus" if summary["cached"] else f"rendered in {summary['seconds']} s"
    console.print(f"[bold]demo corpus[/bold] {summary['manifest']} ({state})")
    table = Table(show_header=True, header_style="bold")
    table.add_column("what")
    table.add_column("count", justify="right")
    for key in ("studies", "images", "patients"):
        if key in summary:
            table.add_row(key, str(summary[key]))
    for split, count in (summary.get("splits") or {}).items():
        table.add_row(f"split {split}", str(count))
    for label, count in (summary.get("labels") or {}).items():
        table.add_row(f"label {label}", str(count))
    table.add_row("studies with unrendered findings", str(summary["unrendered"]))
    console.print(table)
    if "contact_sheet" in summary:
        console.print(f"contact sheet: {summary['contact_sheet']}")
