"""`cxr query IMAGE | --text "..."`: the most similar reports (or images) of an index, as a table or JSON.

IMAGE may also be a folder of images or a manifest (.parquet/.csv): then every image is a query and the results
go to a Parquet file (`--out`), with bad images skipped and listed.
"""

from __future__ import annotations

import json
from pathlib import Path

import typer

from cli.options import DEVICE

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".dcm", ".dicom", ".tif", ".tiff", ".bmp"}
MANIFEST_SUFFIXES = {".parquet", ".csv", ".tsv"}


def _excerpt(text: str, width: int = 110) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= width else text[: width - 1] + "…"


def _batch_queries(image: Path, allow_outside: bool = False) -> tuple[list[str], list[str | None]]:
    """The image paths of a folder (recursive, sorted) or manifest, with each query's patient id when known; a path
    that leaves the folder (symlinks resolved) is refused unless `allow_outside` (a folder's: left out)."""
    from retrieval.data.manifest import is_inside
    from retrieval.errors import UsageError

    if image.is_dir():
        paths = sorted(
            str(p) for p in image.rglob("*")
            if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES and (allow_outside or is_inside(image, p))
        )  # fmt: skip
        if not paths:
            raise UsageError(f"{image}: no image files ({', '.join(sorted(IMAGE_SUFFIXES))}) in this folder")
        return paths, [None] * len(paths)
    from retrieval.data.manifest import read_manifest, resolve_image_path

    df = read_manifest(image)
    root = df.attrs.get("root")
    paths = [str(resolve_image_path(root, p, allow_outside)) if str(p).strip() else "" for p in df["image_path"]]
    return paths, list(df["patient_id"].astype(str)) if "patient_id" in df.columns else [None] * len(paths)


def query_cmd(
    image: Path | None = typer.Argument(
        None, help="Query image (PNG/JPEG/DICOM), or a folder / manifest of query images (needs --out)."
    ),
    index: Path = typer.Option(..., "--index", "-i", help="Index folder (cxr index build)."),
    text: str | None = typer.Option(None, "--text", "-t", help="Query by a sentence instead of an image."),
    model: str | None = typer.Option(None, "--model", help="Model (default: the folder recorded in the index)."),
    k: int = typer.Option(5, "-k", min=1, help="How many results."),
    target: str = typer.Option("reports", "--target", help="Search 'reports' (one per study) or 'images'."),
    nprobe: int | None = typer.Option(
        None, "--nprobe", min=1, help="IVF indexes: inverted lists to visit (default: tuned at build time)."
    ),
    ef_search: int | None = typer.Option(
        None, "--ef-search", min=1, help="HNSW indexes: search breadth (default: tuned at build time)."
    ),
    k_factor: int | None = typer.Option(
        None, "--k-factor", min=1, help="Re-ranking indexes: candidates re-scored per result (default: tuned)."
    ),
    exclude_patient: str | None = typer.Option(None, "--exclude-patient", help="Leave out this patient's rows."),
    findings: str = typer.Option(
        "auto", "--findings", help="Text queries: auto keeps to reports with the findings the text names; off."
    ),
    mmap: bool = typer.Option(False, "--mmap", help="Memory-map the index (IVF only)."),
    backend: str = typer.Option("auto", "--backend", help="auto, faiss, faiss-gpu or torch."),
    device: str = DEVICE,
    out: Path | None = typer.Option(None, "--out", "-o", help="Results Parquet for folder/manifest queries."),
    allow_outside: bool = typer.Option(
        False, "--allow-outside", help="Folder/manifest queries: allow image paths outside its folder."
    ),
    batch_size: int = typer.Option(64, "--batch-size", min=1),
    workers: int = typer.Option(2, "--workers", min=0),
    one_per_patient: bool = typer.Option(
        True, "--one-per-patient/--all-per-patient", help="Each patient's best study only (default), or all."
    ),
    show_far: bool = typer.Option(
        False, "--show-far", help="List the nearest results even when the index says there is no close match."
    ),
    as_json: bool = typer.Option(False, "--json", help="Print results as JSON (for scripts)."),
    wide: bool = typer.Option(False, "--wide", help="The whole report in the table (default: its first sentence)."),
) -> None:
    """Find the reports (or images) most similar to an image or a sentence."""
    from retrieval.errors import UsageError

    if (image is None) == (text is None):
        raise UsageError('give either an IMAGE or --text "..." (exactly one)')
    if target not in ("reports", "images"):
        raise UsageError(f"--target must be 'reports' or 'images', got {target!r}")
    batch = image is not None and (image.is_dir() or image.suffix.lower() in MANIFEST_SUFFIXES)
    if batch and out is None:
        raise UsageError(f"{image}: a folder or manifest of queries writes a results file; pass --out results.parquet")
    if not batch and out is not None:
        raise UsageError("--out is for folder or manifest queries; a single query prints its results")

    from index.image_query import image_query
    from index.search import Searcher
    from index.store import load_recorded_model, open_index

    queries = _batch_queries(image, allow_outside) if batch else None  # containment before anything opens
    # The cheap checks first: a damaged index or an unreadable query image fails in well under a second,
    # before the model (seconds) is loaded.
    opened = open_index(index, mmap=mmap)
    params = dict(nprobe=nprobe, ef_search=ef_search, mmap=mmap, k_factor=k_factor, one_per_patient=one_per_patient)
    if image is not None and not batch:
        from retrieval.data.image_io import read_image

        pixels = read_image(image)
        hits, match = image_query(opened, pixels, k, target, model=model, device=device, backend=backend,
                                  exclude_patient=exclude_patient, **params)  # fmt: skip
        query = {"image": str(image)}
    else:
        m = load_recorded_model(opened.info, index, model, device)
        searcher = Searcher(opened, m, backend=backend, device=device, **params)
        if batch:
            _run_batch(searcher, queries[0], out, k, target, exclude_patient, batch_size, workers, as_json)
            return
        vector = searcher.text_vector(text)
        hits = searcher.text_results(vector, text, k, target, exclude_patient=exclude_patient, findings=findings)
        match = searcher.match(vector, "text", exclude_patient)
        query = {"text": text}
    _answer(hits, match, query, index, target, k, show_far, as_json, wide)


def _answer(hits, match: dict | None, query: dict, index: Path, target: str, k: int, show_far: bool, as_json: bool,
            wide: bool = False) -> None:  # fmt: skip
    """Print the results, or "no close match" in their place when the query is unlike the whole collection."""
    far = match is not None and not match["close"]
    if far and not show_far:
        hits = hits.iloc[0:0]
    if as_json:
        from index.search import result_records

        doc = {**query, "index": str(index), "target": target, "k": k, "no_close_match": far, "match": match}
        typer.echo(json.dumps({**doc, "results": result_records(hits)}, indent=2, ensure_ascii=False))
        return
    if far:
        from rich.console import Console

        Console().print(
            f"[bold yellow]no close match[/]: the nearest scores {match['closeness'] or float('nan'):.3f}, below the "
            f"{match['threshold']:.3f} that {1 - match['quantile']:.0%} of the collection's own held-out queries reach"
            + ("; the nearest results follow, far as they are" if show_far else " (--show-far lists them anyway)")
        )
        if not show_far:
            return
    _print_table(hits, query, target, wide)


def _print_table(hits, query: dict, target: str, wide: bool = False) -> None:
    """One line per hit with the report's first sentence, cut to the terminal's width (80 columns when output is
    not a terminal); `wide`: the whole report, folded."""
    from rich import box
    from rich.console import Console
    from rich.table import Table

    from retrieval.study_text import first_sentence

    console = Console()
    title = f"{target} like " + (f'"{query["text"]}"' if "text" in query else query["image"])
    t = Table(title=title, box=box.SIMPLE_HEAD, pad_edge=False)
    rows = []
    for r in hits.to_dict("records"):
        cells = [str(r["rank"]), f"{r['score']:.3f}", _excerpt(r["study_id"], 16)]
        if target == "images":
            cells.append(_excerpt(Path(r["image_path"]).name, 16))
        rows.append([*cells, ", ".join(r["labels"]) if wide else _excerpt(", ".join(r["labels"]), 20), r["report"]])
    names = ["rank", "score", "study"] + (["image"] if target == "images" else []) + ["labels", "report"]
    widths = [max([len(n)] + [len(row[i]) for row in rows]) for i, n in enumerate(names[:-1])]
    room = max(20, console.width - sum(widths) - 3 * len(names))  # the report line: all the others leave (+ gaps)
    for name in names:
        t.add_column(name, justify="right" if name in ("rank", "score") else "left",
                     overflow="fold" if wide else "ellipsis", no_wrap=not wide)  # fmt: skip
    for row in rows:
        text = str(row[-1] or "").strip()
        report = (_excerpt(text, 100_000) if wide else _excerpt(first_sentence(text) or text, room)) if text else ""
        t.add_row(*row[:-1], report or "[dim](no report)[/]")
    console.print(t)


def _run_batch(searcher, paths: list[str], out: Path, k, target, exclude_patient, batch_size, workers, as_json) -> None:
    from rich.console import Console

    from retrieval.fileio import atomic_path

    excl = [exclude_patient] * len(paths)
    results, bad = searcher.query_images(paths, k, target, excl, batch_size=batch_size, workers=workers)
    results = results.copy()
    results["labels"] = [list(x) for x in results["labels"]]
    with atomic_path(out) as tmp:
        results.to_parquet(tmp, index=False)
    bad_path = out.with_name(out.stem + ".bad_images.csv")
    if len(bad):
        with atomic_path(bad_path) as tmp:
            bad.to_csv(tmp, index=False)
    n_ok = results["query"].nunique() if len(results) else 0
    far = results.loc[~results["close_match"].astype(bool), "query"].nunique() if len(results) else 0
    summary = {
        "queries": len(paths),
        "answered": int(n_ok),
        "no_close_match": int(far),
        "bad_images": len(bad),
        "results": str(out),
        "bad_list": str(bad_path) if len(bad) else None,
    }
    if as_json:
        typer.echo(json.dumps(summary, indent=2))
        return
    console = Console()
    console.print(f"{n_ok:,} of {len(paths):,} queries answered, top-{k} {target} each -> [bold]{out}[/]")
    if far:
        console.print(f"[yellow]{far} of them have no close match in the index (column close_match)[/]")
    if len(bad):
        console.print(f"[yellow]skipped {len(bad)} unreadable image(s); see {bad_path}[/]")
