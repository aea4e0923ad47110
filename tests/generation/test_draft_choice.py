"""Choosing among an LM's report drafts (generation/writing/draft_choice.py) against a naive reference."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from rouge_score import rouge_scorer

from generation.writing.draft_choice import agreement, consensus, pick_draft
from retrieval.labels import NO_FINDING, label_report

SENTENCES = [
    "There is a right pleural effusion.",
    "The heart is enlarged.",
    "No pneumothorax.",
    "The lungs are clear.",
    "A right-sided central venous catheter is in place.",
    "Patchy opacity in the left lower lobe.",
    "No acute cardiopulmonary abnormality.",
]


def _naive_f1(text: str, findings: list[str]) -> float:
    said = set(label_report(text)) - {NO_FINDING} or {NO_FINDING}
    want = set(findings) - {NO_FINDING} or {NO_FINDING}
    tp = sum(1 for f in said if f in want)
    precision, recall = tp / len(said), tp / len(want)
    return 0.0 if tp == 0 else 2 * precision * recall / (precision + recall)


def test_the_draft_that_names_the_heads_findings_wins():
    drafts = ["The lungs are clear. No acute abnormality.", "There is a right pleural effusion. The heart is enlarged."]
    assert pick_draft(drafts, ["Pleural Effusion", "Cardiomegaly"]) == (1, 1.0)
    assert pick_draft(drafts, []) == (0, 1.0)  # nothing found: the normal draft
    half = pick_draft(
        ["There is a right pleural effusion.", "The lungs are clear."], ["Pleural Effusion", "Cardiomegaly"]
    )
    assert half == (0, pytest.approx(2 / 3))


def test_among_equal_agreements_the_consensus_draft_wins():
    drafts = [  # all four read as normal; the third says most of what the others say
        "No acute disease.",
        "Normal chest radiograph.",
        "The lungs are clear. No pneumothorax.",
        "The lungs are clear. No pneumothorax or effusion.",
    ]
    assert [label_report(d) for d in drafts] == [[NO_FINDING]] * 4
    assert max(range(4), key=consensus(drafts).__getitem__) == 2
    assert pick_draft(drafts, []) == (2, 1.0)
    # agreement comes first: a draft that names the head's finding beats the consensus
    assert pick_draft([*drafts, "The heart is enlarged."], ["Cardiomegaly"]) == (4, 1.0)


def test_ties_go_to_the_first_draft_and_empty_is_an_error():
    assert pick_draft(["The lungs are clear.", "No acute disease."], ["Cardiomegaly"]) == (0, 0.0)
    same = ["There is a right pleural effusion.", "There is a right pleural effusion. No pneumothorax."]
    assert pick_draft([same[0], same[1], "The heart is enlarged.", same[0]], []) == (0, 0.0)  # found by hypothesis
    assert consensus(["The lungs are clear."]) == [0.0]
    with pytest.raises(ValueError):
        pick_draft([], ["Cardiomegaly"])


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.lists(st.sampled_from(SENTENCES), min_size=1, max_size=3).map(" ".join), min_size=1, max_size=5),
    st.lists(st.sampled_from(["Pleural Effusion", "Cardiomegaly", "Lung Opacity", "Support Devices"]), max_size=3),
)
def test_pick_draft_matches_a_naive_argmax(drafts, findings):
    scores = [_naive_f1(d, findings) for d in drafts]
    for d, s in zip(drafts, scores, strict=True):
        assert agreement(d, findings) == pytest.approx(s)
    rouge = rouge_scorer.RougeScorer(["rougeL"])
    near = [  # mean ROUGE-L F against every other draft, each pair scored anew, in the other order
        math.fsum(rouge.score(o, d)["rougeL"].fmeasure for j, o in enumerate(drafts) if j != i)
        / max(1, len(drafts) - 1)
        for i, d in enumerate(drafts)
    ]
    keys = list(zip(scores, near, strict=True))
    best = keys.index(max(keys))  # list.index: the first of equals
    assert pick_draft(drafts, findings) == (best, pytest.approx(scores[best]))
