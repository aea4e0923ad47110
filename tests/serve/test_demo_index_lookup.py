"""`cxr serve` with no --index finds the demo index, and the benchmarks find theirs, through the store's own API
(`index.store.has_index`), never by a file name: index_info.json moved into gen-*/ (issue 29, item 20)."""

from __future__ import annotations

import pytest
from index_helpers import FakeModel
from reliability_helpers import vector_index
from repo_paths import REPO

from cli.main import main
from index import store


def test_serve_without_index_serves_the_demo_index(monkeypatch, tmp_path):
    import serve.demo_pipeline as dp

    vector_index(tmp_path / "demo" / "index")  # what `cxr demo` leaves: CURRENT + gen-000001/
    assert not (tmp_path / "demo" / "index" / store.INFO_FILE).exists()
    monkeypatch.setattr(dp, "DEFAULT_WORKDIR", tmp_path / "demo")
    calls = []
    monkeypatch.setattr("cli.serve.serve", lambda *a, **k: calls.append(a))
    assert main(["serve", "--no-vlm"]) == 0
    assert calls and calls[0][0] == tmp_path / "demo" / "index"


def test_the_benchmarks_reuse_an_index_of_generations(tmp_path):
    from benchmarks.query_latency import random_index

    folder = random_index(tmp_path / "idx", FakeModel(), 50)
    first = store.resolve(folder).name
    assert random_index(tmp_path / "idx", FakeModel(), 50) == folder
    assert store.resolve(folder).name == first  # found, not written again


@pytest.mark.parametrize("bench", ["benchmarks/query_latency.py", "benchmarks/serve_latency.py",
                                   "benchmarks/retrieval_quality.py", "cli/serve.py"])  # fmt: skip
def test_no_benchmark_looks_for_the_info_file_by_name(bench):

    text = (REPO / bench).read_text()
    assert "index_info.json\").exists()" not in text and "INFO_FILE).exists()" not in text
