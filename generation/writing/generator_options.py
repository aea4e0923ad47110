"""Where each of the Generator's answers comes from: one `GeneratorOptions` for `Generator`, `generate_for_image`,
`evaluate_generation`, `cxr generate`, `cxr eval generation` and the benchmarks, instead of five loose strings.

The defaults are the project's best answers on the demo and real sets: the heads fitted on the frozen visual
tokens answer what they can (findings, boxes, closed questions), and the report is written from their findings
in the retrieved exemplars' words; `lm` / `generate` hand an answer to the language model instead.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from retrieval.errors import UsageError

VQA_SOURCES = ("head", "lm")  # closed "is there X?" answered by the finding head (heads/head.py) or the LM
# [report]: written from the finding head's findings + the exemplars' sentences (findings_report.py; the LM's draft
# when the VLM has no head), the LM's draft (from every exemplar, or "generate-filtered": only those whose findings the
# head also predicts, LaB-RAG's filter), or the exemplar the finding head ranks first
REPORT_SOURCES = ("findings", "generate", "generate-filtered", "quote")
BOX_SOURCES = ("head", "lm")  # [ground] / [identify] / "where is": the ridge box head (heads/box_head.py) or the LM
# the findings behind closed VQA, [classify], the written report and exemplar ranking: the ridge on the frozen tokens
# (heads/finding_ridge.py; the VLM's auxiliary head in folders that have none) or the auxiliary head (VLM.aux_head)
FINDING_SOURCES = ("ridge", "aux")
CLASSIFY_SOURCES = ("head", "lm")  # [classify]: the findings the finding head predicts, or the LM's answer

ALLOWED = {
    "vqa_source": VQA_SOURCES,
    "report_source": REPORT_SOURCES,
    "box_source": BOX_SOURCES,
    "finding_source": FINDING_SOURCES,
    "classify_source": CLASSIFY_SOURCES,
}


@dataclass(frozen=True)
class GeneratorOptions:
    """The source of each kind of answer; a value outside its `*_SOURCES` is a `UsageError` naming the option."""

    vqa_source: str = "head"
    report_source: str = "findings"
    box_source: str = "head"
    finding_source: str = "ridge"
    classify_source: str = "head"

    def __post_init__(self) -> None:
        for name, allowed in ALLOWED.items():
            value = getattr(self, name)
            if value not in allowed:
                raise UsageError(f"{name} must be one of {allowed}, got {value!r}")

    def replace(self, **changes: str) -> GeneratorOptions:
        """A copy with `changes` (checked like the constructor's)."""
        return dataclasses.replace(self, **changes)

    @classmethod
    def pop_from(cls, settings: dict[str, Any]) -> GeneratorOptions:
        """The options named in `settings` (a benchmark variant's `key=value` pairs), removed from it; the rest stay."""
        return cls(**{name: settings.pop(name) for name in list(settings) if name in ALLOWED})
