"""Inverse-size task sampling (seed 000) and the two-stage schedule (seed 001)."""

from __future__ import annotations

import numpy as np
import pytest

from generation.data.sampling import TaskSampler, inverse_size_weights, stage_tasks


def test_weights_are_inverse_sizes():
    w = inverse_size_weights({"report": 100, "vqa": 400, "ground": 50})
    # 1/100 : 1/400 : 1/50 = 4 : 1 : 8
    assert w == pytest.approx({"report": 4 / 13, "vqa": 1 / 13, "ground": 8 / 13})
    with pytest.raises(ValueError):
        inverse_size_weights({"a": 0})


def test_empirical_task_frequencies_match_inverse_sizes():
    data = {
        "report": [("report", i) for i in range(100)],
        "vqa": [("vqa", i) for i in range(400)],
        "ground": [("ground", i) for i in range(50)],
    }
    sampler = TaskSampler(data, seed=3)
    draws = [ex[0] for _ in range(200) for ex in sampler.sample(64)]
    freq = {t: draws.count(t) / len(draws) for t in data}
    expected = inverse_size_weights({t: len(v) for t, v in data.items()})
    for t in data:
        # 12,800 draws: the binomial standard error is below 0.005
        assert abs(freq[t] - expected[t]) < 0.02, (t, freq[t], expected[t])
    # each task's examples are drawn uniformly: every vqa example appears, none dominates
    vqa_ids = [ex[1] for _ in range(400) for ex in sampler.sample(64) if ex[0] == "vqa"]
    assert len(set(vqa_ids)) > 380  # ~1,970 uniform draws of 400 leave ~3 unseen


def test_sampling_restricted_to_active_tasks_and_resumable():
    data = {"identify": list(range(10)), "report": list(range(1000, 1100))}
    s1 = TaskSampler(data, seed=0)
    assert all(x < 10 for x in s1.sample(50, ["identify"]))
    state = s1.state_dict()
    a = s1.sample(20)
    s2 = TaskSampler(data, seed=99)
    s2.load_state_dict(state)
    assert s2.sample(20) == a


def test_two_stage_schedule():
    tasks = ["report", "vqa", "classify", "identify", "ground"]
    assert stage_tasks(0, 100, tasks, True, 0.3) == ["identify", "ground"]
    assert stage_tasks(29, 100, tasks, True, 0.3) == ["identify", "ground"]
    assert stage_tasks(30, 100, tasks, True, 0.3) == tasks
    assert stage_tasks(0, 100, tasks, False, 0.3) == tasks
    # without grounded tasks there is no first stage
    assert stage_tasks(0, 100, ["report", "vqa"], True, 0.3) == ["report", "vqa"]


def test_sampler_rejects_empty():
    with pytest.raises(ValueError):
        TaskSampler({"report": []})
    assert np.isclose(sum(TaskSampler({"a": [1], "b": [1, 2]}).weights().values()), 1.0)


def test_uniform_rule_gives_every_task_an_equal_share_whatever_its_size():
    from generation.data.sampling import task_weights

    sizes = {"report": 100, "vqa": 400, "ground": 5000}
    assert task_weights(sizes, "uniform") == pytest.approx({t: 1 / 3 for t in sizes})
    assert task_weights(sizes, "proportional")["ground"] == pytest.approx(5000 / 5500)
    # the seed's rule starves the largest task: under 2 % here
    assert task_weights(sizes, "inverse")["ground"] < 0.02
    data = {t: [(t, i) for i in range(n)] for t, n in sizes.items()}
    draws = [ex[0] for ex in TaskSampler(data, seed=1, task_rule="uniform").sample(6000)]
    for t in sizes:
        assert abs(draws.count(t) / len(draws) - 1 / 3) < 0.03
    with pytest.raises(ValueError):
        task_weights(sizes, "nope")


def test_balance_resamples_the_minority_class():
    # 90 normal examples, 10 abnormal: alpha=1 draws both classes equally often, alpha=0 keeps 10 %.
    data = {"report": [("normal", i) for i in range(90)] + [("abnormal", i) for i in range(10)]}
    share = {}
    for alpha in (0.0, 0.5, 1.0):
        s = TaskSampler(data, seed=0, balance=alpha, keys=lambda ex: ex[0])
        draws = s.sample(8000)
        share[alpha] = sum(ex[0] == "abnormal" for ex in draws) / len(draws)
    assert abs(share[0.0] - 0.10) < 0.02
    assert abs(share[1.0] - 0.50) < 0.03
    # alpha 0.5: weights 1/sqrt(90) vs 1/sqrt(10) per example -> 10/sqrt(10) / (10/sqrt(10) + 90/sqrt(90)) = 0.25
    assert abs(share[0.5] - 0.25) < 0.03


def test_row_balance_keys_pick_the_rarest_finding():
    import pandas as pd

    from generation.training.train import row_balance_keys

    df = pd.DataFrame(
        {"labels": [["Cardiomegaly"], ["Cardiomegaly", "Pneumothorax"], ["No Finding"], ["Cardiomegaly"]]}
    )
    keys = row_balance_keys(df, [0, 1, 2, 3])
    assert keys == {0: "Cardiomegaly", 1: "Pneumothorax", 2: "No Finding", 3: "Cardiomegaly"}
