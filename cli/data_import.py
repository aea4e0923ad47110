"""`cxr data import KIND SRC --out MANIFEST` and `cxr data validate MANIFEST`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import typer

from cli import dicomweb_options as web

KIND_HELP = "Source kind: iu-xray | mimic-cxr | covid-cxr | yolo | coco | csv | dicom | dicomweb."


@web.archive_options
def import_cmd(
    kind: str = typer.Argument(..., help=KIND_HELP),
    src: str = typer.Argument(
        ...,
        help="The dataset: a folder, a file (.tgz, .json, .csv, data.yaml), 'builtin' for iu-xray, or the "
        "DICOMweb root URL for dicomweb (e.g. http://127.0.0.1:8042/dicom-web).",
    ),
    out: Path = typer.Option(..., "--out", "-o", help="Manifest to write (.parquet, or .csv)."),
    images: Path = typer.Option(None, "--images", help="Image folder (iu-xray, mimic-cxr, coco, csv, yolo)."),
    boxes: Path = typer.Option(None, "--boxes", help="COCO box file (covid-cxr; default annotations/*.json)."),
    reports: Path = typer.Option(
        None,
        "--reports",
        help="MIMIC-CXR report folder (default: SRC); dicom/dicomweb: a report CSV keyed by "
        "accession_number or study_instance_uid (default: the studies' SR documents).",
    ),
    column_map: str = typer.Option(
        None, "--column-map", help="csv: rename columns, e.g. 'image_id=dicom,report=text' (manifest=source)."
    ),
    seed: int = typer.Option(0, "--seed", help="Seed of the patient-disjoint splits (when the source has none)."),
    as_json: bool = typer.Option(False, "--json", help="Print the summary as JSON."),
    archive: web.ArchiveOptions = None,
) -> None:
    """Import a dataset into a study manifest; skipped rows are reported, never fatal."""
    from retrieval.data.dataset_roots import recorded_roots
    from retrieval.data.importers import NOTES, PROBLEMS, import_source, relativize_paths
    from retrieval.data.manifest import write_manifest
    from retrieval.data.manifest_check import summarize_manifest, validate_manifest

    dicom = web.import_options(kind, out, archive)
    df = import_source(
        kind, src, images=images, boxes=boxes, reports=reports, column_map=column_map, seed=seed, **dicom
    )
    problems = list(df.attrs.get(PROBLEMS, []))
    notes = list(df.attrs.get(NOTES, []))
    df = relativize_paths(df, out.resolve().parent)
    roots = recorded_roots(df)
    if roots and out.suffix.lower() == ".csv":
        notes.append(f"a CSV manifest cannot record the dataset root ({', '.join(roots)}): write .parquet, or pass "
                     "--allow-outside to build and train from it")  # fmt: skip
    problems += [f"manifest {p}" for p in validate_manifest(df)]
    write_manifest(df, out)
    summary = {
        "kind": kind,
        "src": str(src),
        "out": str(out),
        "dataset_roots": roots,
        **summarize_manifest(df, problems),
        "notes": notes,
    }
    if as_json:
        print(json.dumps(summary, indent=2))
    else:
        _print_summary(summary)


def _print_summary(s: dict[str, Any], max_problems: int = 10) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    console.print(f"[bold]{s['kind']}[/bold] {s['src']} -> [bold]{s['out']}[/bold]")
    counts = Table(show_header=False, box=None, pad_edge=False)
    counts.add_column(style="bold")
    counts.add_column()
    for key in (
        "studies",
        "images",
        "patients",
        "images_without_file",
        "images_with_labels",
        "images_with_boxes",
    ):
        counts.add_row(key.replace("_", " "), f"{s[key]:,}")
    counts.add_row("boxes", f"{s['boxes']:,}")
    for key in ("splits", "views", "sources"):
        counts.add_row(key, ", ".join(f"{k} {v:,}" for k, v in s[key].items()) or "-")
    console.print(counts)
    per_label_tables = (("labels (images)", "images", s["labels"]), ("boxes", "boxes", s["boxes_per_label"]))
    for title, unit, per_label in per_label_tables:
        if per_label:
            table = Table(title=title, title_justify="left")
            table.add_column("label")
            table.add_column(unit, justify="right")
            for label, n in per_label.items():
                table.add_row(label, f"{n:,}")
            console.print(table)
    for note in s["notes"]:
        console.print(f"note: {note}", markup=False, highlight=False)
    problems = s["problems"]
    console.print(f"problems: {len(problems)}" + (" (rows skipped and reported, import finished)" if problems else ""))
    for line in problems[:max_problems]:
        console.print(f"  {line}", markup=False, highlight=False)
    if len(problems) > max_problems:
        console.print(f"  ... and {len(problems) - max_problems} more (--json lists all)")


def validate_cmd(
    manifest: Path = typer.Argument(..., help="Study manifest (.parquet or .csv)."),
    check_files: bool = typer.Option(False, "--check-files", help="Also check that every image file exists."),
    allow_outside: bool = typer.Option(
        False, "--allow-outside", help="Accept image paths outside the manifest's folder (as build/train do with it)."
    ),
    as_json: bool = typer.Option(False, "--json", help="Print the problems as JSON."),
) -> None:
    """Check a manifest: ids, duplicates, labels, boxes, splits (a patient in one split), paths that leave the
    manifest's folder and the dataset folder its import recorded (symlinks resolved), files; exit 1 on problems.
    It applies the rules build, add and train apply."""
    from retrieval.data.dataset_roots import recorded_roots
    from retrieval.data.manifest import read_manifest
    from retrieval.data.manifest_check import validate_manifest

    df = read_manifest(manifest)
    problems = validate_manifest(df, check_files=check_files, allow_outside=allow_outside)
    roots = recorded_roots(df)
    if as_json:
        out = {"manifest": str(manifest), "rows": len(df), "dataset_roots": roots,
               "problems": [p.to_dict() for p in problems]}  # fmt: skip
        print(json.dumps(out, indent=2))
    else:
        for p in problems:
            print(p)
        if roots:
            print(f"dataset root(s) recorded by its import: {', '.join(roots)}")
        verdict = "no problems" if not problems else f"{len(problems)} problem(s)"
        files = ", files checked" if check_files else ""
        print(f"{manifest}: {len(df):,} rows, {verdict}{files}")
    if problems:
        raise typer.Exit(1)
