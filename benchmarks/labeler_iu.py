"""The report labeler (`retrieval.labels.label_report`) against the labels implied by the IU X-ray reports'
manual MeSH indexing (`labels_from_mesh`), on every IU report with text and indexing.

    python -m benchmarks.labeler_iu [--src NLMCXR_reports.tgz] [--out benchmarks/results/labeler_iu]

writes `<out>.json` (every score and the command) and `<out>.md` (the table) and prints the table.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from retrieval.data.importers.iu_xray import read_iu_reports
from retrieval.fileio import atomic_path, write_json_atomic
from retrieval.labels import LABELS, label_report, labels_from_mesh
from retrieval.study_text import report_text

COMMAND = "python -m benchmarks.labeler_iu"


def score_labels(truth: list[list[str]], pred: list[list[str]]) -> dict[str, Any]:
    """Per-label precision, recall, F1, support (true count) and predicted count, plus micro and macro averages:
    `generation.evaluation.metrics.multilabel_prf`, the project's one P/R/F1 (micro pools all labels, No Finding
    included; macro averages over the labels in truth or prediction)."""
    from generation.evaluation.metrics import multilabel_prf

    m = multilabel_prf(truth, pred, LABELS, per_label=True)
    return {
        "per_label": m["per_label"],
        **{avg: {k: m[f"{avg}_{k}"] for k in ("precision", "recall", "f1")} for avg in ("micro", "macro")},
        "n_reports": len(truth),
    }


def evaluate_iu(src: str | None = None) -> dict[str, Any]:
    """Score `label_report` (findings + impression) against `labels_from_mesh` on IU reports with text."""
    truth, pred = [], []
    for r in read_iu_reports(src or "builtin"):
        text = report_text(r)
        if not text.strip() or not r["mesh"] or r["mesh"] == ["No Indexing"]:
            continue
        truth.append(labels_from_mesh(r["mesh"]))
        pred.append(label_report(text))
    return score_labels(truth, pred)


def format_scores_markdown(scores: dict[str, Any], command: str) -> str:
    """A markdown table of `score_labels` output, with the command that made it."""
    lines = [
        "# Report labeler vs IU X-ray MeSH-implied labels",
        "",
        f"Made by `{command}` on {scores['n_reports']} IU X-ray reports (findings + impression text;",
        "reports without text or MeSH indexing skipped). Truth = `labels_from_mesh(MeSH major terms)`;",
        "prediction = `label_report(text)`. Uncertain mentions count as negative on both sides.",
        "",
        "| label | precision | recall | F1 | support | predicted |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for label, r in scores["per_label"].items():
        lines.append(
            f"| {label} | {r['precision']:.3f} | {r['recall']:.3f} | {r['f1']:.3f} | {r['support']} | "
            f"{r['predicted']} |"
        )
    for name in ("micro", "macro"):
        r = scores[name]
        lines.append(f"| **{name}** | {r['precision']:.3f} | {r['recall']:.3f} | {r['f1']:.3f} | | |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog=COMMAND, description=__doc__.splitlines()[0])
    ap.add_argument("--src", default=None, help="NLMCXR_reports.tgz (default: the copy inside torchxrayvision)")
    ap.add_argument("--out", default="benchmarks/results/labeler_iu", help="output stem (.md and .json)")
    args = ap.parse_args(argv)
    scores = evaluate_iu(args.src)
    scores["command"] = COMMAND
    md = format_scores_markdown(scores, COMMAND)
    write_json_atomic(Path(args.out).with_suffix(".json"), scores)
    with atomic_path(Path(args.out).with_suffix(".md")) as tmp:
        tmp.write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
