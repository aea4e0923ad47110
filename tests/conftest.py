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


def _test_devices() -> list[str]:
    """TEST_DEVICE (as pytorch-metric-learning's tests read it): the devices of the device-parametrised tests,
    comma separated. Default: the CPU, and CUDA too when torch sees a GPU."""
    if os.environ.get("TEST_DEVICE"):
        return [d.strip() for d in os.environ["TEST_DEVICE"].split(",") if d.strip()]
    import torch

    return ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


# A CUDA parameter carries the `gpu` marker, so `-m "not gpu"` deselects it.
TEST_DEVICES = [pytest.param(d, id=d, marks=pytest.mark.gpu if d.startswith("cuda") else ()) for d in _test_devices()]


@pytest.fixture(params=TEST_DEVICES)
def test_device(request) -> str:
    """Each device of TEST_DEVICE in turn; asking for CUDA where torch sees none fails (never a silent skip)."""
    if request.param.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            pytest.fail(f"TEST_DEVICE asks for {request.param}, which torch does not see")
    return request.param


@pytest.fixture
def fake_models(monkeypatch):
    """`--model fake-N` loads FakeModel(seed=N) (tests/helpers/index_helpers.py) wherever the CLI or `cxr serve`
    loads a model: the command paths without a real network."""
    from index_helpers import FakeModel

    monkeypatch.setattr("retrieval.models.load_model", lambda name, device=None: FakeModel(seed=int(str(name)[-1])))


@pytest.fixture
def orthanc(tmp_path_factory):
    """A fresh, empty loopback Orthanc with the DICOMweb plugin (tests/helpers/orthanc.py), killed by its PID after the
    test (its temporary folder is thrown away). Skips, saying why, only where Debian's orthanc /
    orthanc-dicomweb packages are not installed."""
    from orthanc import find_orthanc, start_orthanc

    binary, _plugin, why = find_orthanc()
    if binary is None:
        pytest.skip(why)
    server = start_orthanc(tmp_path_factory.mktemp("orthanc"))
    try:
        yield server
    finally:
        server.stop(kill=True)


def pytest_collection_modifyitems(config, items):
    """`gpu` tests skip, saying why, where torch sees no CUDA device; unless TEST_DEVICE asks for CUDA (then the
    `test_device` fixture fails them: an explicit request is never silently skipped)."""
    gpu = [item for item in items if item.get_closest_marker("gpu")]
    if not gpu or "cuda" in os.environ.get("TEST_DEVICE", ""):
        return
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device: torch.cuda.is_available() is False (benchmarks/gpu_check.sh)")
    for item in gpu:
        item.add_marker(skip)
