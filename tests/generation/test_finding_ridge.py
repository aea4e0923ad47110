"""The ridge finding head on the frozen tokens: its solution equals the naive primal ridge, it recovers findings
the tokens determine (far above the prevalence-matched constant), its thresholds match prevalence, and it
survives save/load."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from generation.heads.box_head import box_features
from generation.heads.finding_ridge import FindingRidge, fit_finding_ridge


def _tokens(n: int = 300, d: int = 12, seed: int = 0):
    """(n, 9, d) tokens on a 3x3 grid; finding 0 shows in the top-left token, finding 1 in the mean of the
    bottom row, finding 2 is noise (independent of the tokens)."""
    rng = np.random.default_rng(seed)
    vis = torch.tensor(rng.normal(size=(n, 9, d)), dtype=torch.float32)
    y = np.zeros((n, 3), dtype=np.float32)
    y[:, 0] = (vis[:, 0, 0] > 0.5).numpy()
    y[:, 1] = (vis[:, 6:9, 1].mean(1) > 0.0).numpy()
    y[:, 2] = rng.random(n) < 0.3
    return {i: vis[i] for i in range(n)}, {i: torch.tensor(y[i]) for i in range(n)}, y


def test_solution_equals_the_naive_primal_ridge():
    visual, labels, y = _tokens()
    head = fit_finding_ridge(visual, labels, lam=0.5)
    x = box_features(torch.stack([visual[i] for i in range(len(visual))])).astype(np.float64)
    xc = x - x.mean(0)
    reg = 0.5 * np.trace(xc @ xc.T) / len(x)
    w = np.linalg.solve(xc.T @ xc + reg * np.eye(x.shape[1]), xc.T @ (y - y.mean(0)))
    np.testing.assert_allclose(head.weights, w.T, atol=1e-6)
    np.testing.assert_allclose(head.bias, y.mean(0), atol=1e-6)  # centred features: the intercept is the mean


def test_recovers_findings_the_tokens_hold_and_thresholds_match_prevalence():
    from sklearn.metrics import f1_score

    visual, labels, y = _tokens(600)
    train = {i: visual[i] for i in range(400)}
    head = fit_finding_ridge(train, labels)
    pred_train = head.probs(box_features(torch.stack([visual[i] for i in range(400)]))) > head.thresholds
    assert pred_train.sum(0) == pytest.approx(y[:400].sum(0), abs=2)  # predicted as often as present
    test = torch.stack([visual[i] for i in range(400, 600)])
    probs = head.probs(box_features(test))
    assert probs.min() >= 0.0 and probs.max() <= 1.0
    f1 = f1_score(y[400:], probs > head.thresholds, average=None, zero_division=0)
    # naive reference: the prevalence-matched constant guess (everyone positive for a finding with p >= 0.5)
    const = f1_score(y[400:], np.tile(y[:400].mean(0) >= 0.5, (200, 1)), average=None, zero_division=0)
    assert f1[0] > 0.7 and f1[1] > 0.8 and f1[0] > const[0] + 0.5 and f1[1] > const[1] + 0.1
    assert f1[2] < 0.5  # noise stays noise


def test_save_load_roundtrip(tmp_path):
    visual, labels, _ = _tokens()
    head = fit_finding_ridge(visual, labels)
    head.save(tmp_path)
    back = FindingRidge.load(tmp_path)
    x = box_features(torch.stack([visual[i] for i in range(20)]))
    np.testing.assert_allclose(back.probs(x), head.probs(x), atol=1e-5)
    np.testing.assert_allclose(back.thresholds, head.thresholds, atol=1e-6)
    assert FindingRidge.load(tmp_path / "none") is None
    assert fit_finding_ridge({}, labels) is None
