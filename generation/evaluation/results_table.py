"""The markdown of a generation evaluation (`cxr eval generation`, the benchmarks): one table per task, conditions
as rows and metrics as columns, saying when n is a seeded sample of the split; then the RAG diagnostics."""

from __future__ import annotations

from typing import Any


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return "nan" if v != v else f"{v:.3f}"
    return str(v)


def len_sampled(res: dict, task: str) -> tuple[int, int]:
    """(examples scored, examples the split has) for `task`; equal when nothing was sampled."""
    n = max((int(m.get("n", 0)) for m in res["tasks"][task].values()), default=0)
    return n, max(n, int(res.get("examples_available", {}).get(task, n)))


def results_markdown(res: dict) -> str:
    """One markdown table per task: conditions as rows, metrics as columns."""
    lines = []
    for task, conds in res["tasks"].items():
        cols = [c for c in next(iter(conds.values())) if c != "gt_boxes"]
        n, of = len_sampled(res, task)
        sampled = f" (n = {n}: a seeded sample of the split's {of}; --max-per-task 0 takes all)" if n < of else ""
        lines += [
            f"### [{task}]{sampled}",
            "",
            "| condition | " + " | ".join(cols) + " |",
            "|---" * (len(cols) + 1) + "|",
        ]
        for cond, m in conds.items():
            lines.append(f"| {cond} | " + " | ".join(_fmt(m.get(c)) for c in cols) + " |")
        lines.append("")
    if res.get("rag"):
        cols = list(next(iter(res["rag"].values())))
        lines += ["### RAG: are the exemplars informative, does the output copy them?", ""]
        lines += ["| k | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
        for kk, m in res["rag"].items():
            lines.append(f"| {kk} | " + " | ".join(_fmt(m.get(c)) for c in cols) + " |")
        lines.append("")
    return "\n".join(lines)
