"""`cxr data merge A B ... --out M` and `cxr data split M --out M2`: combine and re-split manifests."""

from __future__ import annotations

import json
from pathlib import Path

import typer


def _write(df, out: Path, as_json: bool, extra: dict) -> None:
    from retrieval.data.importers import relativize_paths
    from retrieval.data.manifest import write_manifest
    from retrieval.data.manifest_check import validate_manifest

    notes = list(df.attrs.get("notes", []))
    df = relativize_paths(df, out.resolve().parent)
    problems = [str(p) for p in validate_manifest(df)]
    write_manifest(df, out)
    summary = {**extra, "out": str(out), "rows": len(df), "notes": notes, "problems": problems}
    if as_json:
        print(json.dumps(summary, indent=2))
        return
    for line in notes + [f"problem: {p}" for p in problems[:10]]:
        print(line)
    print(f"-> {out} ({len(df):,} rows, {len(problems)} problem(s))")


def merge_cmd(
    manifests: list[Path] = typer.Argument(..., help="Two or more manifests (.parquet or .csv)."),
    out: Path = typer.Option(..., "--out", "-o", help="The merged manifest to write (.parquet or .csv)."),
    prefix: bool = typer.Option(
        False, "--prefix", help="Prefix each manifest's image/study/patient ids with its file name (ids that clash)."
    ),
    as_json: bool = typer.Option(False, "--json", help="Print the summary as JSON."),
) -> None:
    """Combine manifests into one; image paths are rewritten relative to the new manifest's folder."""
    from retrieval.data.manifest_edit import merge_manifests

    _write(merge_manifests(manifests, prefix=prefix), out, as_json, {"manifests": [str(m) for m in manifests]})


def split_cmd(
    manifest: Path = typer.Argument(..., help="The manifest to re-split."),
    out: Path = typer.Option(..., "--out", "-o", help="The manifest to write (.parquet or .csv)."),
    fractions: str = typer.Option("train=0.8,val=0.1,test=0.1", "--fractions", help="Split fractions."),
    seed: int = typer.Option(0, "--seed", help="Seed of the patient shuffle."),
    as_json: bool = typer.Option(False, "--json", help="Print the summary as JSON."),
) -> None:
    """Assign new patient-disjoint splits (every image of a patient in one split), seeded."""
    from retrieval.data.manifest import read_manifest
    from retrieval.data.manifest_edit import parse_fractions, resplit

    df = resplit(read_manifest(manifest), parse_fractions(fractions), seed)
    _write(df, out, as_json, {"manifest": str(manifest), "seed": seed})
