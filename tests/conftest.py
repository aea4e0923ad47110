"""Shared test fixtures. Tests never download: the hub is forced offline here."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
if "CXR_ONNX_DIR" not in os.environ:  # exported ONNX graphs of frozen towers: a folder of this session's own
    import tempfile

    os.environ["CXR_ONNX_DIR"] = tempfile.mkdtemp(prefix="cxr-test-onnx-")

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The real chest X-ray sets beside the project; tests that need them skip with a reason when absent."""
    if not (SHARED_DATA / "covid-cxr").is_dir() or not (SHARED_DATA / "tbx11k-tb").is_dir():
        pytest.skip(f"real data not found at {SHARED_DATA} (it lives beside the project as ../shared/data)")
    return SHARED_DATA
