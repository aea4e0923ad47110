"""`cxr index build | add | info | verify | gc | repair`: thin commands over index.build and index.store."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from cli.options import DEVICE

INDEX = typer.Argument(..., help="Index folder.")
AS_JSON = typer.Option(False, "--json", help="Print the result as JSON.")


def _printed_json(obj: object, as_json: bool) -> bool:
    """With --json: print `obj` as JSON and say so (the command has nothing more to print)."""
    if as_json:
        typer.echo(json.dumps(obj, indent=2, default=str))
    return as_json


def _print_result(result, as_json: bool, verb: str) -> None:
    from rich.console import Console

    if _printed_json(result.as_dict(), as_json):
        return
    d = result.as_dict()
    console = Console()
    if d["already_done"]:
        console.print(
            f"nothing to do: [bold]{d['index']}[/] already holds this {'build' if verb == 'built' else 'add'} "
            f"({d['count']:,} images, {d['generation']}); leftovers of an interrupted run were removed"
        )
        return
    console.print(
        f"{verb} [bold]{d['index']}[/]: {d['added']:,} images ({d['count']:,} in the index, factory {d['factory']}) "
        f"in {d['seconds']:.1f} s; {d['resumed_rows']:,} rows were already done from an interrupted run"
    )
    for target, rec in (d.get("search") or {}).items():
        params = ", ".join(f"{k} {v}" for k, v in rec.get("params", {}).items()) or "none (exact)"
        colour = "" if rec.get("met", True) else "[yellow]"
        console.print(
            f"{colour}{target}: search parameters {params}; recall@{rec['k']} {rec['recall']:.3f} "
            f"(target {rec['target']:.2f}, {rec['queries']:,} sample queries)"
            + ("" if rec.get("met", True) else " [bold]below the target[/]")
        )
    if d["bad_images"]:
        console.print(
            f"[yellow]skipped {d['bad_images']} row(s) ({d['refused_rows']} refused by the manifest check, "
            f"the rest unreadable images); see {d['bad_list']}[/]"
        )


ALLOW_OUTSIDE = typer.Option(
    False, "--allow-outside", help="Allow image paths outside the manifest's folder (`..`, other absolute paths)."
)
SKIP_BAD_ROWS = typer.Option(
    False,
    "--skip-bad-rows",
    help="Skip manifest rows that fail the check (listed in bad_images.csv) instead of failing.",
)


def build_cmd(
    manifest: Path = typer.Option(..., "--manifest", "-m", help="Study manifest (.parquet or .csv)."),
    model: str = typer.Option(..., "--model", help="Model folder (saved by `cxr train`) or model name."),
    out: Path = typer.Option(..., "--out", "-o", help="Index folder to create (rerun the same command to resume)."),
    factory: str | None = typer.Option(
        None,
        "--factory",
        help="faiss index_factory string (experts); default by size and --max-memory: Flat, HNSW32,Flat, "
        "IVF..,PQ..x4fs,RFlat (re-ranked)",
    ),
    target_recall: float = typer.Option(
        0.95, "--target-recall", min=0.01, max=1.0, help="recall@10 the tuned search parameters must reach."
    ),
    max_memory: str | None = typer.Option(
        None, "--max-memory", help="RAM budget of each FAISS index (e.g. 2G, 512M); picks a smaller re-ranked type."
    ),
    engine: str = typer.Option(
        "local", "--engine", help="local (DataLoader workers) or ray (Ray Data actors; needs the 'ray' extra)."
    ),
    ray_address: str | None = typer.Option(
        None, "--ray-address", help="Ray cluster to join (e.g. ray://head:10001 or auto); default: a local Ray."
    ),
    ray_actors: int | None = typer.Option(None, "--ray-actors", min=1, help="Encoding actors (default: one per CPU)."),
    ray_gpus: float = typer.Option(0, "--ray-gpus", min=0, help="GPUs per Ray actor (1 on a GPU cluster)."),
    batch_size: int = typer.Option(64, "--batch-size", min=1, help="Images per encoder batch."),
    workers: int = typer.Option(2, "--workers", min=0, help="DataLoader processes decoding images."),
    shard_rows: int = typer.Option(1024, "--shard-rows", min=1, help="Rows per committed shard (resume unit)."),
    device: str = DEVICE,
    allow_outside: bool = ALLOW_OUTSIDE,
    skip_bad_rows: bool = SKIP_BAD_ROWS,
    as_json: bool = AS_JSON,
) -> None:
    """Build an image + report index from a manifest: streaming, resumable after a kill, bad images skipped."""
    from index.build import BuildOptions, build_index
    from index.factory import parse_memory
    from index.rows import prepare

    budget = parse_memory(max_memory)
    if engine == "ray":
        from index.ray_build import require_ray

        require_ray()  # before the manifest check and the model load
    prepare(manifest, allow_outside, skip_bad_rows)  # a bad manifest fails before the model loads
    from retrieval.models import load_model

    m = load_model(model, device=device)
    opts = BuildOptions(
        factory=factory, batch_size=batch_size, workers=workers, shard_rows=shard_rows, model_path=model,
        allow_outside=allow_outside, skip_bad_rows=skip_bad_rows, target_recall=target_recall, max_memory=budget,
        engine=engine, ray_address=ray_address, ray_actors=ray_actors, ray_gpus=ray_gpus,
    )  # fmt: skip
    result = build_index(manifest, m, out, options=opts)
    _print_result(result, as_json, "built")


def add_cmd(
    index: Path = typer.Option(..., "--index", "-i", help="Existing index folder."),
    manifest: Path = typer.Option(..., "--manifest", "-m", help="Manifest of the studies to append."),
    model: str | None = typer.Option(None, "--model", help="Model (default: the folder recorded in the index)."),
    batch_size: int = typer.Option(64, "--batch-size", min=1),
    workers: int = typer.Option(2, "--workers", min=0),
    shard_rows: int = typer.Option(1024, "--shard-rows", min=1),
    device: str = DEVICE,
    allow_outside: bool = ALLOW_OUTSIDE,
    skip_bad_rows: bool = SKIP_BAD_ROWS,
    as_json: bool = AS_JSON,
) -> None:
    """Append studies to an index (same model fingerprint; image_ids already in the index are refused)."""
    from index.build import BuildOptions, add_to_index
    from index.rows import prepare
    from index.store import load_recorded_model, read_info

    info = read_info(index)
    prepare(manifest, allow_outside, skip_bad_rows)  # a bad manifest fails before the model loads
    m = load_recorded_model(info, index, model, device)
    opts = BuildOptions(
        batch_size=batch_size, workers=workers, shard_rows=shard_rows, allow_outside=allow_outside,
        skip_bad_rows=skip_bad_rows,
    )  # fmt: skip
    result = add_to_index(index, manifest, m, options=opts)
    _print_result(result, as_json, "added to")


def info_cmd(
    index: Path = INDEX,
    as_json: bool = typer.Option(False, "--json", help="Print the summary as JSON."),
) -> None:
    """Summarise an index: size, factory, model, label and split counts, skipped images, files."""
    from rich.console import Console
    from rich.table import Table

    from index.verify import index_summary

    s = index_summary(index)
    if _printed_json(s, as_json):
        return
    t = Table(title=f"index {s['path']}", show_header=False)
    t.add_column(style="bold")
    t.add_column()
    model = s["model"]
    rows = [
        ("images (rows)", f"{s['rows']:,}"),
        ("studies / patients", f"{s['studies']:,} / {s['patients']:,}"),
        ("with report text", f"{s['with_report']:,}"),
        ("factory / metric", f"{s['factory']} / {s['metric']} (L2-normalised, dim {s['dim']})"),
        *_search_rows(s.get("search")),
        ("reports", s.get("reports", "")),
        ("model", f"{model.get('name')}  fingerprint {model.get('fingerprint')}  {model.get('path', '')}"),
        ("splits", ", ".join(f"{k or '(none)'} {v:,}" for k, v in s["splits"].items())),
        ("labels", ", ".join(f"{k} {v:,}" for k, v in s["labels"].items())),
        ("skipped images", f"{s['bad_images']:,}" + (" (bad_images.csv)" if s["bad_images"] else "")),
        ("generation", s.get("generation", "")),
        ("created / updated", f"{s.get('created', '')} / {s.get('updated', '-')}"),
        ("versions", ", ".join(f"{k} {v}" for k, v in s.get("versions", {}).items())),
        ("files", ", ".join(f"{k} {v / 1e6:.2f} MB" for k, v in s["files"].items())),
    ]
    for k, v in rows:
        t.add_row(k, str(v))
    Console().print(t)


def _search_rows(search: dict | None) -> list[tuple[str, str]]:
    """`cxr index info` lines for the tuned search parameters (an index written before tuning has none)."""
    if not search:
        return [("search parameters", "not tuned (built before tuning): faiss defaults")]
    out = []
    for target, rec in search.items():
        params = ", ".join(f"{k} {v}" for k, v in rec.get("params", {}).items())
        if rec.get("method") == "exact":
            text = "none (exact search)"
        else:
            text = (
                f"{params or 'defaults'}: recall@{rec['k']} {rec['recall']:.3f} on {rec['queries']:,} sample "
                f"queries (target {rec['target']:.2f}{'' if rec.get('met', True) else ', NOT reached'})"
            )
        out.append((f"search ({target})", text))
    return out


def verify_cmd(index: Path = INDEX, as_json: bool = AS_JSON) -> None:
    """Check every file of the current generation against its recorded size and sha256 (exit 1 if damaged)."""
    from index.verify import verify_index

    r = verify_index(index)
    if _printed_json(r, as_json):
        return
    typer.echo(
        f"ok: {r['index']} ({r['generation']}, {r['rows']:,} rows): {len(r['files'])} files, "
        f"{r['bytes'] / 1e6:.2f} MB verified in {r['seconds']:.2f} s"
    )
    for line in r["model_caches"]:
        typer.echo(f"warning: the index's model folder: {line}", err=True)


def gc_cmd(index: Path = INDEX, as_json: bool = AS_JSON) -> None:
    """Remove superseded generations no reader holds, unfinished ones and temporary files."""
    from index.generations import gc_index

    r = gc_index(index)
    if _printed_json(r, as_json):
        return
    typer.echo(
        f"{index}: removed {len(r['removed'])} generation(s)"
        + (f" ({', '.join(r['removed'])})" if r["removed"] else "")
        + (f"; kept {', '.join(r['kept'])} (a reader holds it)" if r["kept"] else "")
    )


def repair_cmd(index: Path = INDEX, as_json: bool = AS_JSON) -> None:
    """Point CURRENT at the newest generation that verifies (after CURRENT was lost or damaged)."""
    from index.generations import repair_index

    r = repair_index(index)
    if _printed_json(r, as_json):
        return
    if r["repaired"]:
        typer.echo(f"{index}: CURRENT restored to {r['generation']} (every file verified)")
    else:
        typer.echo(f"{index}: nothing to repair, CURRENT points to {r['generation']}, which verifies")
