"""`cxr models list|info|prefetch|verify|export|unpack|relink`: prepare models for offline machines and check them.

The library side is `retrieval.models.bundle`; each command prints a short table or, with `--json`, a JSON object.
"""

from __future__ import annotations

import json
from pathlib import Path

import typer

from retrieval.errors import CXRError

app = typer.Typer(
    help="List, inspect, prefetch, verify and export models (offline machines).",
    no_args_is_help=True,
    rich_markup_mode=None,  # plain help, as cli/main.py's PLAIN_HELP says why
)


def _emit(obj: object, as_json: bool, text: str) -> None:
    print(json.dumps(obj, indent=2, default=str) if as_json else text)


@app.command("list")
def list_cmd(as_json: bool = typer.Option(False, "--json", help="Print JSON.")) -> None:
    """Model names, what each is, and whether it is usable offline now."""
    from retrieval.models import list_models
    from retrieval.models.bundle import METRIC_WEIGHTS
    from retrieval.models.model_status import offline_status
    from retrieval.models.registry import resolve

    rows = []
    for name in list_models():
        ok, why = offline_status(name)
        rows.append({"name": name, "offline": ok, "why": why, "description": resolve(name).description})
    from generation.evaluation.report_metrics import weights_status

    for name, what in METRIC_WEIGHTS.items():
        ok, why = weights_status(name)  # report-metric weights (--metrics NAME), in their default places
        rows.append({"name": name, "offline": ok, "why": why, "description": what})
    from generation.model.language_model import LM_REGISTRY, lm_status

    for name, entry in LM_REGISTRY.items():  # the VLM's language models (`cxr vlm train --lm NAME`)
        ok, why = lm_status(name)
        rows.append({"name": name, "offline": ok, "why": why, "description": entry.description})
    lines = [f"{'name':<16} {'offline':<8} description"]
    for r in rows:
        desc = r["description"].split(". ")[0][:90]
        lines.append(
            f"{r['name']:<16} {'yes' if r['offline'] else 'no':<8} {desc}" + ("" if r["offline"] else f"  [{r['why']}]")
        )
    lines.append(
        "also: timm:NAME, hf:ORG/NAME (image towers by name), hf-hub:ORG/REPO, local-dir:PATH, or a folder saved by "
        "`cxr train` / `cxr models prefetch`"
    )
    _emit(rows, as_json, "\n".join(lines))


@app.command("info")
def info_cmd(
    model: str = typer.Argument(..., help="A model name or folder."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
) -> None:
    """Towers, dims, preprocessing, fingerprint, and the files with their sizes."""
    from generation.model.language_model import LM_REGISTRY, lm_info
    from retrieval.models.model_status import format_size, model_info

    info = lm_info(model) if model in LM_REGISTRY else model_info(model)
    lines = [f"{k}: {v}" for k, v in info.items() if k not in ("files", "bundle", "description")]
    if info.get("description"):
        lines.insert(1, f"description: {info['description']}")
    for f in info.get("files", []):
        lines.append(f"  {format_size(f['bytes']):>10}  {f['path']}")
    _emit(info, as_json, "\n".join(lines))


@app.command("prefetch")
def prefetch_cmd(
    model: str = typer.Argument(..., help="A model name (biomedclip, cxr-small, hf-hub:ORG/REPO, chexbert, ...)."),
    to: Path = typer.Option(..., "--to", help="The folder to fill (self-contained: copy it to the offline machine)."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
) -> None:
    """Download (or build) everything MODEL needs into one folder that loads with HF_HUB_OFFLINE=1 and no cache."""
    from generation.model.language_model import LM_REGISTRY, prefetch_lm
    from retrieval.models.bundle import CHECKSUMS_FILE, read_checksums
    from retrieval.models.prefetch import prefetch

    folder = prefetch_lm(model, to) if model in LM_REGISTRY else prefetch(model, to)
    files = read_checksums(folder)
    _emit(
        {"model": model, "folder": str(folder), "files": len(files)},
        as_json,
        f"{model} -> {folder} ({len(files)} files, {CHECKSUMS_FILE} written); check it with "
        f"`cxr models verify {folder}`",
    )


@app.command("verify")
def verify_cmd(
    folder: Path = typer.Argument(..., help="A folder written by `cxr train`, `prefetch` or `unpack`."),
    no_encode: bool = typer.Option(False, "--no-encode", help="Only check the checksums."),
    write: bool = typer.Option(False, "--write", help="(Re)write checksums.sha256 from the files as they are now."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
) -> None:
    """Check sha256 checksums, build the model, encode one image and one sentence; exit 1 naming a bad file."""
    from generation.model.language_model import is_lm_folder, verify_lm
    from retrieval.models.bundle import write_checksums
    from retrieval.models.model_status import verify

    if write:
        write_checksums(folder)
    res = verify_lm(folder, run=not no_encode) if is_lm_folder(folder) else verify(folder, encode=not no_encode)
    lines = [f"{folder}: {res['checked']} files checked"]
    if "sample" in res:
        lines.append(f"loaded and generated: {res['sample']!r}")
    if "fingerprint" in res:
        lines.append(f"built and encoded: embed_dim {res['embed_dim']}, fingerprint {res['fingerprint'][:16]}…")
    if res["unlisted"]:
        lines.append(f"not in the checksum list (not checked): {', '.join(res['unlisted'][:5])}")
    lines += [f"note: {n}" for n in res.get("notes", [])]
    lines += [f"WARN {w}" for w in res.get("warnings", [])]
    lines += [f"FAIL {p}" for p in res["problems"]] or ["OK"]
    _emit(res, as_json, "\n".join(lines))
    if not res["ok"]:
        raise typer.Exit(1)


@app.command("export")
def export_cmd(
    folder: Path = typer.Argument(..., help="A model folder (trained or prefetched)."),
    to: Path = typer.Option(..., "--to", help="The tar file to write."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
) -> None:
    """Pack a model folder with its checksums into FILE.tar (checked first); unpack with `cxr models unpack`."""
    from retrieval.models.bundle import export

    tar = export(folder, to)
    _emit(
        {"folder": str(folder), "tar": str(tar), "bytes": tar.stat().st_size},
        as_json,
        f"{folder} -> {tar} ({tar.stat().st_size} bytes); on the other machine: cxr models unpack {tar.name} --to DIR",
    )


@app.command("unpack")
def unpack_cmd(
    tar: Path = typer.Argument(..., help="A tar written by `cxr models export`."),
    to: Path = typer.Option(..., "--to", help="The folder to unpack into."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
) -> None:
    """Unpack an exported model, point its text tower at its new place, and check its checksums."""
    from retrieval.models.bundle import unpack

    folder = unpack(tar, to)
    _emit({"tar": str(tar), "folder": str(folder)}, as_json, f"{tar} -> {folder} (checksums OK)")


@app.command("relink")
def relink_cmd(folder: Path = typer.Argument(..., help="A model folder that was moved or copied.")) -> None:
    """Point open_clip_config.json's text tower at this folder's own text/ (after moving a folder)."""
    from retrieval.models.bundle import relink

    if not (folder / "open_clip_config.json").is_file():
        raise CXRError(f"{folder}: not a model folder (no open_clip_config.json)")
    print(f"{folder}: {'relinked' if relink(folder) else 'already linked'}")
