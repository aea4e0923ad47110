"""What a drafted report holds for a structured report (generation/writing/structured_report.py): the `[report]` answer,
its findings, the `[identify]` boxes on the same visual tokens, and the exemplars with their Study Instance UIDs."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from generation.data.tasks import PROMPTS
from generation.writing.generate import Generator
from generation.writing.image_answer import image_and_exemplars
from retrieval.labels import LABELS, NO_FINDING, label_report


def draft_findings(report: dict, boxes: Sequence[dict]) -> list[str]:
    """The findings a drafted report states: the finding head's (`head_findings`), else the labeler's reading of its
    text; `No Finding` when neither it nor a box names any."""
    found = report.get("head_findings")
    if found is None:
        found = [f for f in label_report(report["text"]) if f in LABELS]
    found = [f for f in found if f != NO_FINDING]
    return found or ([] if boxes else [NO_FINDING])


def draft_for_image(
    image: str | Path | np.ndarray,
    index_dir: str | Path | None,
    vlm_dir: str | Path,
    k: int = 3,
    generator: Generator | None = None,
    device: str | None = None,
) -> dict:
    """What a structured report holds (generation/writing/structured_report.py): the `[report]` answer (text, exemplars,
    ...) plus `findings` (the finding head's, else what the labeler reads in the text), `boxes` (the
    `[identify]` answer on the same tokens) and each exemplar's `study_instance_uid` ('' when the index has none)."""
    gen = generator or Generator(vlm_dir, index_dir if k > 0 else None, device=device)
    image, exemplars = image_and_exemplars(gen, image, k, None, None)
    visual = gen.visual([image])
    report, identify = gen.generate(
        visual.expand(2, *visual.shape[1:]),
        ["report", "identify"],
        [PROMPTS["report"], PROMPTS["identify"]],
        exemplars * 2,
    )
    boxes = identify.get("boxes", [])
    findings = draft_findings(report, boxes)
    uids: dict[str, str] = {}
    if gen.searcher is not None:
        meta = gen.searcher.index.meta
        uids = dict(zip(meta["study_id"].astype(str), meta["study_instance_uid"].astype(str), strict=True))
    exemplar_rows = [{**e, "study_instance_uid": uids.get(str(e["study_id"]), "")} for e in report["exemplars"]]
    return {**report, "findings": findings, "boxes": boxes, "exemplars": exemplar_rows}
