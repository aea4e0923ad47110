"""The served data of tests/serve/: a synthetic index (FakeModel over `gen_synth`'s images: bright boxes that match
their labels) and the tiny patch-encoder VLM trained on it for 120 steps, module-scoped. Nothing is downloaded."""

from __future__ import annotations

import pytest
from gen_synth import make_manifest, tiny_vlm_config
from index_helpers import FakeModel


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """(root, manifest frame, index folder) over 36 synthetic studies."""
    from index.build import BuildOptions, build_index

    root = tmp_path_factory.mktemp("serve")
    df = make_manifest(root, n=36)
    build_index(df, FakeModel(), root / "idx", options=BuildOptions(workers=0, progress=False))
    return root, df, root / "idx"


@pytest.fixture(scope="module")
def vlm(data):
    from generation.training.train import train_vlm

    root, df, idx = data
    train_vlm(df, root / "vlm", tiny_vlm_config(120), index_dir=idx, progress=False)
    return root / "vlm"
