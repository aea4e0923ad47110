"""`cxr demo`: the README's main job, end to end and offline, on the embedded demo corpus."""

from __future__ import annotations

import json
import time
from pathlib import Path

import typer

from serve.demo_pipeline import DEMO_SIZE


def demo_cmd(
    workdir: Path = typer.Option(
        None, "--workdir", help="Where the corpus, model, index and VLM are cached [default: $CXR_HOME/demo]"
    ),
    size: int = typer.Option(DEMO_SIZE, help="Demo image size in pixels."),
    seed: int = typer.Option(0, help="Seed for the corpus and the training runs."),
    k: int = typer.Option(5, "-k", help="How many reports to retrieve."),
    limit: int = typer.Option(None, help="Only the first N IU reports (a quicker, smaller demo)."),
    no_generate: bool = typer.Option(False, "--no-generate", help="Stop after retrieval."),
    as_json: bool = typer.Option(False, "--json", help="Print the result as JSON."),
    serve: bool = typer.Option(False, "--serve", help="Then serve the demo: the API and web viewer (cxr serve)."),
    host: str = typer.Option("127.0.0.1", "--host", help="With --serve: the address to bind."),
    port: int = typer.Option(8000, "--port", help="With --serve: the port."),
) -> None:
    """Build the demo corpus, train cxr-small, index it, query a held-out abnormal image, and draft its report."""
    from cli.quiet import quiet_transformers
    from retrieval.progress import console as err_console
    from serve.demo_pipeline import DEFAULT_WORKDIR, run_demo

    quiet_transformers()

    t0 = time.perf_counter()
    res = run_demo(
        workdir or DEFAULT_WORKDIR,
        size=size,
        seed=seed,
        k=k,
        limit=limit,
        generate=not no_generate,
        log=lambda msg: err_console.print(f"[bold cyan]{msg}[/]"),
    )
    total = time.perf_counter() - t0
    if as_json:
        out = res.as_dict()
        out["total_s"] = round(total, 2)
        typer.echo(json.dumps(out, indent=2, default=str))
    else:
        _print_demo(res, total)
    if serve:
        from cli.serve import serve as start_server

        vlm = res.workdir / "vlm"
        start_server(res.workdir / "index", vlm if (vlm / "vlm_config.json").exists() else None, host=host, port=port)


def _print_demo(res, total: float) -> None:
    from rich.console import Console
    from rich.table import Table

    con = Console()
    q = res.query
    con.rule("Query (held-out test study, never indexed)")
    con.print(f"[bold]{Path(q['image']).name}[/]  study {q['study_id']}  labels: {', '.join(q['labels'])}")
    con.print(f"[dim]true report:[/] {q['report']}")
    table = Table(title=f"Top {len(res.retrieved)} retrieved reports", show_lines=True)
    for col in ("rank", "score", "study", "labels", "shares", "report"):
        table.add_column(col, overflow="fold")
    shared = q["shared_findings"]
    for r, common in zip(res.retrieved.itertuples(), shared, strict=True):
        labels = ", ".join(r.labels) if len(r.labels) else ""
        mark = ", ".join(common) if common else "-"
        table.add_row(str(r.rank), f"{r.score:.3f}", str(r.study_id), labels, mark, str(r.report)[:300])
    con.print(table)
    n_shared = sum(1 for c in shared if c)
    con.print(f"[bold]{n_shared} of the top {len(shared)} reports share a finding with the query[/]")
    if res.generated is not None:
        g = res.generated
        con.rule("Drafted report (retrieval-augmented, k=3) beside the true report")
        side = Table(show_lines=True)
        side.add_column("true report", overflow="fold", ratio=1)
        side.add_column("drafted report", overflow="fold", ratio=1)
        side.add_row(q["report"], g.get("text", ""))
        con.print(side)
        found = g.get("findings") or {}
        con.print(f"[dim]written by: {g.get('source', 'lm')}[/]")
        con.print(
            f"findings named: {', '.join(found.get('named', [])) or 'none'}; "
            f"true among them: [bold]{', '.join(found.get('true', [])) or 'none'}[/]"
        )
        copied = {c["ref"]: c["sentences"] for c in g.get("copied") or []}
        for e in g.get("exemplars") or []:
            what = f"copied: {'; '.join(copied[e['ref']])}" if e["ref"] in copied else "nothing copied"
            con.print(f"[dim][ref {e['ref']}] study {e.get('study_id')} ({e.get('score', 0):.3f}): {what}[/]")
    steps = ", ".join(f"{name} {sec:.1f}s" for name, sec in res.timings.items())
    con.print(f"[dim]steps: {steps}; total {total:.1f}s; cached in {res.workdir}[/]")
