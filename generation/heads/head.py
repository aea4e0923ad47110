"""The VLM's auxiliary finding head at inference: closed "is there X?" answers and exemplar choice from it.

The head (`VLM.aux_head`, a linear layer on the mean projected visual token, trained with BCE beside the LM)
learns the findings in a few hundred CPU steps, long before the small LM learns to read them in its answers
(benchmarks/results/generation_demo.md). Two uses, each a `Generator` option measured against the LM alone:

- `closed_answer`: "is there X?" for a finding X of `LABELS` is answered "yes" when the head's probability for X
  passes X's threshold. Thresholds are fitted once at the end of training on the training rows
  (`fit_thresholds`: each finding's predicted-positive rate matches its prevalence), saved in `vlm_config.json`.
- `rank_exemplars`: the retrieved exemplars re-ordered by how likely the head finds their findings (the
  labeler's labels of each exemplar report, scored as independent Bernoulli outcomes under the head's
  probabilities); `[report]` with `report_source="quote"` quotes the best one.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import numpy as np

from generation.data.rag import Exemplar
from retrieval.labels import LABELS, NO_FINDING, label_report, multi_hot

_CLOSED_RE = re.compile(r"^is there (?:an? )?(.+?)\s*\?$")
_LABEL_INDEX = {lab.lower(): i for i, lab in enumerate(LABELS)}


def fit_thresholds(probs: np.ndarray, targets: np.ndarray, default: float = 0.5) -> list[float]:
    """Per-finding thresholds on (N, L) probabilities: the value above which as many rows are predicted
    positive as `targets` (N, L) has positives; `default` for a finding without positives."""
    out = []
    for j in range(probs.shape[1]):
        n_pos = int(targets[:, j].sum())
        if n_pos == 0 or n_pos >= len(probs):
            out.append(default)
            continue
        order = np.sort(probs[:, j])[::-1]
        out.append(float((order[n_pos - 1] + order[n_pos]) / 2))
    return out


def closed_finding(question: str) -> int | None:
    """The LABELS index a closed question "is there X?" asks about, or None."""
    m = _CLOSED_RE.match(question.strip().lower())
    return _LABEL_INDEX.get(m.group(1)) if m else None


def predicted_findings(probs: np.ndarray, thresholds: Sequence[float]) -> list[str]:
    """Findings (not No Finding) whose head probability passes its threshold, most likely first."""
    idx = [j for j, lab in enumerate(LABELS) if lab != NO_FINDING and float(probs[j]) > float(thresholds[j])]
    return [LABELS[j] for j in sorted(idx, key=lambda j: -float(probs[j]))]


def closed_answer(question: str, probs: np.ndarray, thresholds: Sequence[float]) -> str | None:
    """ "yes"/"no" for a closed question about a known finding (probs: (L,) for one image), else None."""
    j = closed_finding(question)
    if j is None:
        return None
    return "yes" if float(probs[j]) > float(thresholds[j]) else "no"


def exemplar_log_likelihood(report: str, probs: np.ndarray) -> float:
    """log P(the report's labeler labels | head probabilities), findings independent."""
    p = np.clip(np.asarray(probs, dtype=np.float64), 1e-4, 1 - 1e-4)
    y = multi_hot([label_report(report)])[0].astype(np.float64)
    return float((y * np.log(p) + (1 - y) * np.log(1 - p)).sum())


def rank_exemplars(exemplars: Sequence[Exemplar], probs: np.ndarray) -> list[Exemplar]:
    """Exemplars ordered by `exemplar_log_likelihood` (best first; ties keep retrieval order)."""
    scores = [exemplar_log_likelihood(e.report, probs) for e in exemplars]
    order = sorted(range(len(exemplars)), key=lambda i: (-scores[i], i))
    return [exemplars[i] for i in order]


def aux_head_thresholds(vlm, visual: dict, label_rows: dict) -> list[float]:
    """The VLM's auxiliary finding head's per-finding thresholds, fitted on the training rows (`fit_thresholds`);
    `visual`: row -> frozen tokens, `label_rows`: row -> multi-hot labels."""
    import torch

    order = sorted(visual)
    probs = torch.cat(
        [
            vlm.finding_probs(torch.stack([visual[r] for r in order[i : i + 256]]).float())
            for i in range(0, len(order), 256)
        ]
    )
    targets = torch.stack([label_rows[r] for r in order])
    return [round(t, 4) for t in fit_thresholds(probs.numpy(), targets.numpy())]


def agreeing_exemplars(exemplars: Sequence[Exemplar], probs: np.ndarray, thresholds: Sequence[float]) -> list[Exemplar]:
    """The exemplars that agree with the head (LaB-RAG's label filter), in retrieval order: every finding the
    labeler reads in the exemplar is one the head predicts, and a normal exemplar only when the head predicts
    nothing (an exemplar that reports what the head does not see, or calls normal what it sees, pulls the LM into
    writing it). None when none agrees: the LM then writes from the findings line alone."""
    predicted = set(predicted_findings(probs, thresholds))
    out = []
    for e in exemplars:
        found = set(label_report(e.report)) - {NO_FINDING}
        if found <= predicted and (bool(found) or not predicted):
            out.append(e)
    return out
