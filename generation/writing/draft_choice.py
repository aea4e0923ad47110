"""Choosing, among an LM's drafts of one report, the one that says what the image reader saw.

A LoRA-tuned LM reads the "Likely findings" line, but its single (greedy, contrastive) draft often leaves out a
finding the line names (support devices, a second finding after a long first sentence) or adds one it does not.
The Generator can draw several drafts (the greedy one first, then samples; `generate.report_decoding(drafts=N)`);
this module keeps the draft whose findings, as the labeler reads them (`retrieval.labels.label_report`, the same
labeler every report metric uses), agree best with the finding head's: F1 between the two label sets, "No Finding"
standing for an empty set. Among the drafts that agree equally well, it keeps the one that says most what the other
drafts say (the minimum-Bayes-risk choice, Kumar and Byrne 2004): the highest mean ROUGE-L F-measure against the
other drafts. Sampled drafts wander in wording; the consensus draft keeps the words they share. Chosen on the
validation split over the greedy draft, the longest draft and the retrieved reports as the tie-break; on test it is
level with the greedy tie-break (benchmarks/results/generation_demo.md). Remaining ties go to the earlier draft.
The text stays the LM's own; only the choice among its drafts looks at the head.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from rouge_score import rouge_scorer

from retrieval.labels import NO_FINDING, label_report


def _as_set(findings: Sequence[str]) -> set[str]:
    found = {f for f in findings if f != NO_FINDING}
    return found or {NO_FINDING}


def agreement(text: str, findings: Sequence[str]) -> float:
    """F1 between the findings the labeler reads in `text` and `findings` (empty = "No Finding"), in [0, 1]."""
    said, want = _as_set(label_report(text)), _as_set(findings)
    return 2 * len(said & want) / (len(said) + len(want))


def consensus(drafts: Sequence[str]) -> list[float]:
    """Each draft's mean ROUGE-L F-measure against the other drafts (0 for a lone draft)."""
    scorer = rouge_scorer.RougeScorer(["rougeL"])
    n = len(drafts)
    sim = [[0.0] * n for _ in range(n)]
    for i in range(n):
        for j in range(i + 1, n):  # ROUGE-L's F-measure is symmetric
            sim[i][j] = sim[j][i] = scorer.score(drafts[i], drafts[j])["rougeL"].fmeasure
    return [math.fsum(row) / (n - 1) if n > 1 else 0.0 for row in sim]  # fsum: equal drafts tie exactly


def pick_draft(drafts: Sequence[str], findings: Sequence[str]) -> tuple[int, float]:
    """(index, agreement) of the draft that agrees best with `findings`; among equals, the one closest to the other
    drafts (`consensus`), then the first."""
    if not drafts:
        raise ValueError("pick_draft needs at least one draft")
    scores = [agreement(d, findings) for d in drafts]
    near = consensus(drafts)
    best = max(range(len(drafts)), key=lambda i: (scores[i], near[i], -i))
    return best, scores[best]
