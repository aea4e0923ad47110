"""Compatibility as a test (issue 29, item 21): every fixture folder under tests/fixtures/compat/, written by an
earlier release (tests/helpers/compat_fixtures.py), must still open and answer exactly as that release did, or be
refused in one line (an index: naming `cxr index upgrade`). Fixtures are added for each new format, never replaced."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from compat_fixtures import QUERY_TEXTS, ROOT, query_images, query_vectors, vlm_inputs

from retrieval.errors import CXRError, IndexError_, ModelLoadError

FIXTURES = sorted(p for p in ROOT.iterdir() if (p / "expected.json").is_file()) if ROOT.is_dir() else []


def test_there_are_fixtures_and_they_stay_small():
    assert FIXTURES, f"no compatibility fixtures in {ROOT}"
    total = sum(f.stat().st_size for f in ROOT.rglob("*") if f.is_file())
    assert total < 4 * 2**20 * len(FIXTURES), f"{total / 2**20:.1f} MiB of fixtures"


@pytest.fixture(params=FIXTURES, ids=lambda p: p.name, scope="module")
def fixture(request, tmp_path_factory) -> tuple[Path, dict]:
    """A copy of one fixture folder (nothing a test does can change the committed files) and its answers."""
    copy = tmp_path_factory.mktemp("compat") / request.param.name
    shutil.copytree(request.param, copy)
    return copy, json.loads((request.param / "expected.json").read_text())


@pytest.fixture(scope="module")
def model(fixture):
    from retrieval.models import load_model

    folder, _ = fixture
    return load_model(folder / "model", device="cpu")


def test_the_model_folder_loads_and_encodes_as_before(fixture, model):
    from retrieval.models.bundle import relink
    from retrieval.models.model_status import verify

    folder, expected = fixture
    relink(folder / "model")  # the folder moved (a clone elsewhere): what `cxr models relink` does
    assert verify(folder / "model", encode=False)["ok"]
    assert model.fingerprint == expected["model"]["fingerprint"]
    np.testing.assert_allclose(model.encode_texts(QUERY_TEXTS), expected["model"]["texts"], atol=1e-5)
    np.testing.assert_allclose(model.encode_images(query_images()), expected["model"]["images"], atol=1e-5)


@pytest.mark.parametrize("name", ["index-flat", "index-ivf"])
def test_the_index_opens_and_answers_as_before(fixture, model, name):
    from index.search import Searcher
    from index.verify import index_summary, verify_index

    folder, expected = fixture
    want = expected[name]
    try:
        verify_index(folder / name)
        index_summary(folder / name)
        searcher = Searcher(folder / name, model)
    except IndexError_ as e:  # a format this release no longer reads: one line, naming the migration
        assert "cxr index upgrade" in str(e) and "\n" not in str(e)
        return
    for target in ("images", "reports"):
        scores, ids = searcher.search_ids(query_vectors(), k=5, target=target)
        np.testing.assert_array_equal(ids, want[target]["ids"])
        np.testing.assert_allclose(scores, want[target]["scores"], atol=1e-6)
    got = [searcher.query_text(t, k=3, findings="off")["row_id"].tolist() for t in QUERY_TEXTS]
    assert got == want["text"]


def test_the_vlm_folder_loads_and_generates_as_before(fixture):
    """The VLM's format is being changed (SmolLM2 as the language model): a folder of an earlier format must
    still load and answer the same, or be refused in one clear line."""
    from generation.model.vlm import VLM

    folder, expected = fixture
    try:
        vlm = VLM.load(folder / "vlm")
        vlm.load_encoders(folder / "vlm")
    except (ModelLoadError, CXRError) as e:
        assert "\n" not in str(e) and str(folder / "vlm") in str(e)
        return
    visual, prompts = vlm_inputs()
    assert vlm.generate(visual, prompts, max_new_tokens=8) == expected["vlm"]["generated"]
