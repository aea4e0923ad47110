"""The report written from the finding head: it names exactly the predicted findings, prefers the exemplars'
words, never negates a predicted finding and never repeats a sentence."""

from __future__ import annotations

import numpy as np
import pytest

from generation.data.rag import Exemplar
from generation.evaluation.metrics import repeats_a_sentence
from generation.writing.findings_report import (
    FINDING_SENTENCES,
    NORMAL_SENTENCE,
    finding_sides,
    findings_report,
    predicted_findings,
)
from retrieval.labels import LABELS, NO_FINDING, label_report

FINDINGS = [lab for lab in LABELS if lab != NO_FINDING]
REPORTS = [
    "The heart is normal in size. There is a small left pleural effusion. No pneumothorax.",
    "Heart size is normal. No pleural effusion. There is patchy opacity in the right lower lobe.",
    "The lungs are clear. No pneumothorax or pleural effusion. Degenerative changes of the spine.",
    "Cardiomegaly with pulmonary edema. A right chest tube is present.",
]


def _ex(i: int, report: str) -> Exemplar:
    return Exemplar(study_id=f"S{i}", patient_id=f"P{i}", report=report, score=1.0 - 0.1 * i)


def test_every_template_reads_as_exactly_its_finding():
    assert set(FINDING_SENTENCES) == set(FINDINGS)
    for lab, sentence in FINDING_SENTENCES.items():
        assert label_report(sentence) == [lab], sentence


@pytest.mark.parametrize("seed", range(25))
def test_report_names_exactly_the_predicted_findings(seed):
    rng = np.random.default_rng(seed)
    probs, thresholds = rng.random(len(LABELS)), rng.uniform(0.3, 0.9, len(LABELS))
    exemplars = [_ex(i, REPORTS[j]) for i, j in enumerate(rng.permutation(len(REPORTS))[: rng.integers(0, 4)])]
    rep = findings_report(probs, thresholds, exemplars)
    naive = [lab for j, lab in enumerate(LABELS) if lab != NO_FINDING and probs[j] > thresholds[j]]
    assert sorted(rep.findings) == sorted(naive)
    assert rep.findings == sorted(naive, key=lambda lab: -probs[LABELS.index(lab)])  # most likely first
    assert label_report(rep.text) == ([lab for lab in LABELS if lab in naive] or [NO_FINDING])
    assert not repeats_a_sentence(rep.text)


def _probs(*findings: str) -> tuple[np.ndarray, list[float]]:
    p = np.full(len(LABELS), 0.1)
    for f in findings:
        p[LABELS.index(f)] = 0.9
    return p, [0.5] * len(LABELS)


def test_exemplar_sentences_are_preferred_and_negations_of_predictions_dropped():
    probs, thr = _probs("Pleural Effusion")
    rep = findings_report(probs, thr, [_ex(0, REPORTS[1]), _ex(1, REPORTS[0])])
    assert "there is a small left pleural effusion." in rep.text  # the exemplar's words, not the template
    assert FINDING_SENTENCES["Pleural Effusion"] not in rep.text
    assert "no pleural effusion." not in rep.text  # would negate the predicted finding
    assert "there is patchy opacity in the right lower lobe." not in rep.text  # a finding not predicted
    assert "no pneumothorax." in rep.text and rep.from_exemplars >= 2


def test_template_when_no_exemplar_has_the_finding_and_normal_without_anything():
    probs, thr = _probs("Fracture")
    rep = findings_report(probs, thr, [_ex(0, REPORTS[2])])
    assert rep.text.startswith(FINDING_SENTENCES["Fracture"])
    assert predicted_findings(*_probs()) == []
    assert findings_report(*_probs()).text == NORMAL_SENTENCE


def test_a_normal_sentence_is_not_said_twice_in_other_words():
    probs, thr = _probs()
    reports = ["The heart is normal in size. No pneumothorax.", "Heart size is normal. No pneumothorax."]
    rep = findings_report(probs, thr, [_ex(i, r) for i, r in enumerate(reports)])
    assert rep.text == "the heart is normal in size. no pneumothorax."


def test_a_sentence_that_names_the_other_side_is_not_quoted():
    """The box head puts the effusion on the patient's right: the exemplar's "left pleural effusion" would say the
    wrong side, so the next fitting sentence (no side) or the template is written instead."""
    probs, thr = _probs("Pleural Effusion")
    exemplars = [_ex(0, REPORTS[0]), _ex(1, "Blunting of the costophrenic angle from a pleural effusion.")]
    assert "left pleural effusion" in findings_report(probs, thr, exemplars).text
    for side in ("right", "left"):
        rep = findings_report(probs, thr, exemplars, sides={"Pleural Effusion": side})
        named = "left pleural effusion" in rep.text
        assert named == (side == "left")
        assert label_report(rep.text) == ["Pleural Effusion"]
    only_left = findings_report(probs, thr, [_ex(0, REPORTS[0])], sides={"Pleural Effusion": "right"})
    assert only_left.text.startswith(FINDING_SENTENCES["Pleural Effusion"])
    both = [_ex(0, "Bilateral pleural effusions.")]
    bilateral = findings_report(probs, thr, both, sides={"Pleural Effusion": "right"})
    assert "bilateral" not in bilateral.text


def test_finding_sides_read_the_patients_side_of_the_best_box_in_one_half():
    """Image left half = the patient's right (frontal view); a box across the midline places nothing; the
    highest-scored box of a finding decides; box names map to labels through the labeler."""
    boxes = [
        {"label": "Opacity", "x1": 0.1, "y1": 0.2, "x2": 0.4, "y2": 0.5, "score": 0.2},
        {"label": "Opacity", "x1": 0.6, "y1": 0.2, "x2": 0.9, "y2": 0.5, "score": 0.9},
        {"label": "Nodule", "x1": 0.2, "y1": 0.2, "x2": 0.3, "y2": 0.3, "score": -1.0},
        {"label": "Cardiomegaly", "x1": 0.3, "y1": 0.4, "x2": 0.7, "y2": 0.8, "score": 5.0},
    ]
    assert finding_sides(boxes) == {"Lung Opacity": "left", "Lung Lesion": "right"}
    assert finding_sides([]) == {}


def test_sentences_with_a_deidentified_gap_are_not_quoted():
    from retrieval.study_text import whole_sentences

    report = "Heart size is normal. The pulmonary XXXX and mediastinum are within normal limits. No X-XXXX change."
    assert whole_sentences(report) == ["heart size is normal.", "no x-ray change."]
    numbered = "1. No acute disease. 2. Stable cardiomegaly."
    assert whole_sentences(numbered) == ["no acute disease.", "stable cardiomegaly."]
    rep = findings_report(*_probs(), [_ex(0, report)])
    assert "pulmonary and mediastinum" not in rep.text and "heart size is normal." in rep.text


def test_agreeing_exemplars_keep_only_what_the_head_also_sees():
    """LaB-RAG's filter: an exemplar passes when its labeler findings are among the head's predicted findings,
    and a normal one only when the head predicts nothing."""
    from generation.heads.head import agreeing_exemplars

    def ex(i, report):
        return Exemplar(study_id=f"s{i}", patient_id=f"p{i}", score=1.0 - i / 10, report=report)

    pool = [ex(0, "Cardiomegaly. Small right pleural effusion."), ex(1, "Cardiomegaly."), ex(2, "Normal chest."),
            ex(3, "Right pneumothorax.")]  # fmt: skip
    thresholds = [0.5] * len(LABELS)
    probs = np.zeros(len(LABELS))
    probs[LABELS.index("Cardiomegaly")] = 0.9
    assert [e.study_id for e in agreeing_exemplars(pool, probs, thresholds)] == ["s1"]
    probs[LABELS.index("Pleural Effusion")] = 0.7
    assert [e.study_id for e in agreeing_exemplars(pool, probs, thresholds)] == ["s0", "s1"]
    assert [e.study_id for e in agreeing_exemplars(pool, np.zeros(len(LABELS)), thresholds)] == ["s2"]


def test_training_findings_lines_from_labels_name_exactly_the_true_findings():
    """`findings_lines(source="labels")`: each row's line names its own findings (with the side its box gives) and
    nothing else, at LABEL_PROB; a normal row's line is "none"."""
    import pandas as pd
    import torch

    from generation.writing.findings_prompt import LABEL_PROB, findings_lines
    from retrieval.labels import multi_hot

    labels = [["Cardiomegaly"], ["Pleural Effusion", "Atelectasis"], ["No Finding"]]
    boxes = [[], [{"label": "Pleural Effusion", "x1": 0.6, "y1": 0.6, "x2": 0.9, "y2": 0.9}], []]
    df = pd.DataFrame({"labels": labels, "boxes": boxes})
    rows = {i: torch.tensor(v, dtype=torch.float32) for i, v in enumerate(multi_hot(labels))}
    visual = {i: torch.zeros(4, 3) for i in range(3)}
    lines = findings_lines(df, visual, rows, seed=0, source="labels")
    assert lines[0] == f"Likely findings: cardiomegaly ({LABEL_PROB:.2f})."
    assert "pleural effusion" in lines[1] and "atelectasis" in lines[1] and "cardiomegaly" not in lines[1]
    assert lines[2] == "Likely findings: none."
