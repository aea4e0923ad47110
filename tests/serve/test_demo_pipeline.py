"""`cxr demo` end to end on a tiny slice of the demo corpus: every step runs, then every step is cached."""

from __future__ import annotations

import json

import pytest

from cli.main import main
from serve import demo_pipeline


@pytest.mark.slow
def test_demo_runs_end_to_end_then_reuses_every_step(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(demo_pipeline, "TRAIN_EPOCHS", 1)
    args = ["demo", "--workdir", str(tmp_path), "--limit", "60", "--size", "128", "-k", "3", "--json"]

    assert main(args) == 0
    first = json.loads(capsys.readouterr().out)
    assert not any(first["cached"].values())
    query = first["query"]
    assert query["study_id"] and query["report"]
    assert len(first["retrieved"]) == 3
    # the query is a held-out test study: it is never in the index, so never retrieved
    assert query["study_id"] not in {r["study_id"] for r in first["retrieved"]}
    gen = first["generated"]
    assert gen["task"] == "report" and gen["text"].strip() and gen["source"] == "lm"  # SmolLM2, zero-shot
    assert 1 <= len(gen["exemplars"]) <= 3  # the exemplars that fit the prompt's token budget
    assert query["study_id"] not in {e["study_id"] for e in gen["exemplars"]}

    assert main(args) == 0
    second = json.loads(capsys.readouterr().out)
    assert all(second["cached"].values()), second["cached"]
    assert second["query"] == query
    assert [r["study_id"] for r in second["retrieved"]] == [r["study_id"] for r in first["retrieved"]]
