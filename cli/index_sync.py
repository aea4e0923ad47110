"""`cxr index sync URL --index IDX`: a thin command over index.dicomweb_sync."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from cli import dicomweb_options as web
from cli.options import DEVICE


@web.archive_options
def sync_cmd(
    url: str = typer.Argument(..., help="The archive's DICOMweb root, e.g. http://127.0.0.1:8042/dicom-web."),
    index: Path = typer.Option(..., "--index", "-i", help="Existing index folder to extend."),
    model: str | None = typer.Option(None, "--model", help="Model (default: the folder recorded in the index)."),
    batch_size: int = typer.Option(64, "--batch-size", min=1),
    workers: int = typer.Option(2, "--workers", min=0, help="Decoding worker processes of the add."),
    device: str = DEVICE,
    as_json: bool = typer.Option(False, "--json", help="Print the result as JSON."),
    archive: web.ArchiveOptions = None,
) -> None:
    """Add the archive's CR/DX radiographs that the index does not hold yet (run twice, the second adds nothing)."""
    from index.build import BuildOptions
    from index.dicomweb_sync import read_state, sync_index
    from index.store import load_recorded_model, read_info

    info = read_info(index)
    load = lambda: load_recorded_model(info, index, model, device)  # noqa: E731 (only when something is new)
    default = None if read_state(index).get("cache") else web.default_cache(index)
    opts = BuildOptions(batch_size=batch_size, workers=workers)
    result = sync_index(url, index, None, archive.cache or default, opts, archive.query(), load_model=load)
    if as_json:
        typer.echo(json.dumps(result.as_dict(), indent=2))
        return
    typer.echo(f"sync {index}: {result.found} radiograph(s) in the archive, {result.new} new, {result.added} added")
    for line in result.problems[:10]:
        typer.echo(f"  {line}")
    if len(result.problems) > 10:
        typer.echo(f"  ... and {len(result.problems) - 10} more (--json lists all)")
