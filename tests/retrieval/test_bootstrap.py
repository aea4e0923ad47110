"""retrieval/bootstrap.py: the AUROC against scikit-learn, intervals against the normal approximation."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from retrieval.bootstrap import auroc, auroc_interval, interval, resampled


def test_auroc_matches_sklearn_with_ties() -> None:
    rng = np.random.default_rng(0)
    pos, neg = rng.integers(0, 5, 40).astype(float), rng.integers(0, 4, 60).astype(float)  # many ties
    want = roc_auc_score(np.r_[np.ones(40), np.zeros(60)], np.r_[pos, neg])
    assert auroc(pos, neg) == pytest.approx(want)
    est = auroc_interval(pos, neg)
    assert est.low <= est.value <= est.high and est.high - est.low < 0.4


def test_interval_of_hits_matches_the_normal_approximation() -> None:
    hits = np.random.default_rng(1).random(400) < 0.3
    est = interval(hits.astype(float))
    half = 1.96 * np.sqrt(est.value * (1 - est.value) / len(hits))
    assert est.value == pytest.approx(hits.mean())
    assert est.low == pytest.approx(est.value - half, abs=0.01) and est.high == pytest.approx(
        est.value + half, abs=0.01
    )
    assert interval([1.0, 1.0, 1.0]).text() == "1.000 [1.000, 1.000]"  # degenerate: no resampling error
    assert interval([0.9, 0.8, 0.95, 0.85]).above(interval([0.1, 0.2, 0.15, 0.3]))


def test_resampled_mean_is_the_interval_of_the_values_and_a_paired_difference_cancels_shared_noise() -> None:
    v = np.random.default_rng(2).random(60)
    assert resampled(len(v), lambda i: v[i].mean()) == interval(v)  # the same resamples of the same items
    a = np.random.default_rng(3).random(80) * 10  # per-item noise far larger than the gap between the systems
    b = a + 0.05
    paired = resampled(len(a), lambda i: b[i].mean() - a[i].mean())
    assert paired.value == pytest.approx(0.05) and paired.high - paired.low < 1e-9  # shared noise cancels
    assert not interval(b).above(interval(a))  # unpaired intervals overlap: they cannot tell the two apart
    assert resampled(1, lambda i: float(len(i))).text() == "1.000 [1.000, 1.000]"
