"""`cxr generate IMAGE --index IDX --vlm DIR`: a report (or answer, diagnoses, boxes) for one radiograph."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from cli import dicomweb_options as web
from cli.options import DEVICE

REPORT_SOURCE_HELP = (
    "[report]: findings (the template writer), generate (the LM writes it from the findings + exemplars), "
    "generate-filtered (the same, from only the exemplars whose findings agree), quote (the best exemplar)."
)

CONTRAST_HELP = (
    "With --report-source generate: decode the LM's report contrastively at this strength (0 = off; ~1 makes a "
    "LoRA-tuned LM write the findings its prompt names instead of a stock normal report)."
)
DRAFTS_HELP = (
    "With --report-source generate: write this many drafts (the greedy one, then samples) and keep the one whose "
    "findings agree best with the finding head's, of equals the one closest to the other drafts (1 = the greedy draft "
    "alone)."
)


def generate_cmd(
    image: Path = typer.Argument(..., help="A radiograph: PNG, JPEG or DICOM."),
    vlm: Path = typer.Option(..., "--vlm", help="A VLM folder written by `cxr vlm train`."),
    index: Path = typer.Option(None, "--index", help="Index folder to retrieve exemplar reports from."),
    task: str = typer.Option("report", "--task", help="report | vqa | classify | identify | ground | segment."),
    question: str = typer.Option(None, "--question", help="The question for --task vqa."),
    phrase: str = typer.Option(None, "--phrase", help="The anatomy or finding for --task ground or segment."),
    k: int = typer.Option(3, "-k", help="Exemplar reports in the prompt (0 = no retrieval)."),
    report_source: str = typer.Option("findings", "--report-source", help=REPORT_SOURCE_HELP),
    contrast: float = typer.Option(0.0, "--contrast", help=CONTRAST_HELP),
    drafts: int = typer.Option(1, "--drafts", help=DRAFTS_HELP),
    as_json: bool = typer.Option(False, "--json", help="Print the result as JSON."),
    device: str = DEVICE,
    sr: Path = typer.Option(None, "--sr", help="Also write the drafted report as a DICOM SR (IMAGE must be DICOM)."),
    store: str = typer.Option(None, "--store", help="Send the SR to this DICOMweb URL with STOW-RS."),
    token: str = web.TOKEN,
    user: str = web.USER,
    password: str = web.PASSWORD,
) -> None:
    """Generate for one image; the output names the exemplar studies the prompt carried."""
    from cli.quiet import quiet_transformers
    from generation.writing.image_text_to_text import is_image_text_to_text
    from retrieval.errors import UsageError

    quiet_transformers()
    if k < 0:
        raise UsageError("-k must be >= 0")
    if k > 0 and index is None:
        raise UsageError("retrieval needs --index (or pass -k 0)")
    lm_report = task == "report" and report_source.startswith("generate") and sr is None and store is None
    for flag, given in (("--contrast", contrast != 0), ("--drafts", drafts != 1)):
        if given and not lm_report:  # they shape the LM's own report only: say so instead of ignoring them
            raise UsageError(f"{flag} shapes the LM's report: it needs --task report --report-source generate")
    if sr is not None or store is not None:
        if is_image_text_to_text(vlm):  # a fine-tuned pretrained VLM (`cxr vlm train --base-vlm`)
            raise UsageError("--sr/--store take the project's own VLM folder (cxr vlm train), not a --base-vlm one")
        res = _structured_report(image, index, vlm, task, k, device, sr, store, token, user, password)
    else:
        from generation.writing.generate import report_decoding
        from generation.writing.generator_options import GeneratorOptions
        from generation.writing.image_answer import generate_for_image

        res = generate_for_image(  # either VLM kind: the project's own, or a --base-vlm fine-tuned one
            image, index, vlm, task=task, k=k, question=question, phrase=phrase, device=device,
            options=GeneratorOptions(report_source=report_source), decoding=report_decoding(contrast, drafts),
        )  # fmt: skip
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
    if "sr" in res:
        where = [f"written to {res['sr']['path']}"] if res["sr"]["path"] else []
        where += [f"stored at {res['sr']['stored']}"] if res["sr"]["stored"] else []
        c.print(f"SR (unverified draft, SOP Instance UID {res['sr']['sop_instance_uid']}) {' and '.join(where)}")


def _structured_report(image, index, vlm, task, k, device, sr, store, token, user, password) -> dict:
    """The draft (report text, findings, boxes, exemplars) as a Comprehensive SR: written to `sr`, sent to
    `store`. The source is checked first: a PNG/JPEG is refused before the model loads."""
    from generation.writing.draft import draft_for_image
    from generation.writing.structured_report import build_sr, read_source, store_sr, write_sr
    from retrieval.errors import UsageError

    if task != "report":
        raise UsageError(f"--sr and --store write the drafted report; drop --task {task}")
    read_source(image)
    res = draft_for_image(image, index, vlm, k=k, device=device)
    ds = write_sr(res, image, sr) if sr is not None else build_sr(res, read_source(image))
    if store is not None:
        from retrieval.data.importers.dicomweb import Auth

        store_sr(ds, store, Auth.from_env(token, user, password))
    res["sr"] = {"path": str(sr) if sr else None, "stored": store, "sop_instance_uid": str(ds.SOPInstanceUID)}
    return res
