"""Findings-aware text search: the report labeler reads the query and the indexed reports, negation included.

A sentence embedding puts "pleural effusion" next to "no pleural effusion": on the demo, raw MiniLM and the
projected model both return normal reports for "pulmonary edema" (benchmarks/results/quality_demo.md). So when a
text query names a finding positively (`retrieval.labels.label_report_detailed`: "large right pleural effusion" ->
Pleural Effusion), the Searcher keeps to the rows whose report the labeler reads as having every finding the query
names, ranked by the embedding as before, and fills up with the plain ranking when fewer than k qualify. A query
that names no finding ("right lower lobe", "no acute disease") is searched by the embedding alone.

The rows' findings come from the index meta's `report_findings` column when the build stored one, else the
labeler reads each distinct report once per opened index, at its first such query (about 1 ms a report).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np
import pandas as pd

log = logging.getLogger(__name__)
COLUMN = "report_findings"
MODES = ("auto", "off")


def query_findings(text: str) -> frozenset[str]:
    """The findings a query names positively (none for a query that names none, or only negates them)."""
    from retrieval.labels import label_report_detailed

    return frozenset(label for label, status in label_report_detailed(text).items() if status == "positive")


def report_findings(reports: Sequence[str]) -> list[list[str]]:
    """Each report's positive findings as the labeler reads them ([] for a row without a report)."""
    from retrieval.labels import NO_FINDING, label_report

    return [[x for x in label_report(r) if x != NO_FINDING] if r else [] for r in reports]


def row_findings(meta: pd.DataFrame) -> list[frozenset[str]]:
    """Per index row, the findings of its report: the stored column, or the labeler run now."""
    if COLUMN in meta.columns:
        return [frozenset(x) if x is not None else frozenset() for x in meta[COLUMN]]
    log.info("labelling %d indexed reports for findings-aware text search", len(meta))
    has = meta["has_report"].to_numpy(dtype=bool) if "has_report" in meta.columns else np.ones(len(meta), bool)
    texts = [str(r) if h else "" for r, h in zip(meta["report"].fillna(""), has, strict=True)]
    unique = list(dict.fromkeys(texts))  # a report repeats per image of its study, and normal reports repeat
    found = dict(zip(unique, (frozenset(x) for x in report_findings(unique)), strict=True))
    return [found[t] for t in texts]


def rows_with(findings: Sequence[frozenset[str]], want: frozenset[str]) -> np.ndarray:
    """Boolean mask of the rows whose findings include all of `want`."""
    return np.fromiter((want <= f for f in findings), dtype=bool, count=len(findings))
