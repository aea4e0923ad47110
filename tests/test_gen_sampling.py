"""Inverse-size task sampling (seed 000) and the two-stage schedule (seed 001)."""

from __future__ import annotations

import numpy as np
import pytest

from retrieval.generation.sampling import TaskSampler, inverse_size_weights, stage_tasks


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
