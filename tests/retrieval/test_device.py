"""One reading of `--device`: None (a library default) and "auto" (the CLI default) resolve alike everywhere."""

from __future__ import annotations

import faiss
import numpy as np
import pytest
import torch
from gen_synth import UNIT_LM, one_thread  # noqa: F401 (an autouse fixture)

from generation.model.encoders import FrozenPatchEncoder
from generation.model.vlm import VLM
from generation.writing import generate as generate_module
from generation.writing.generator_options import GeneratorOptions
from index import backends
from retrieval.device import resolve_device


@pytest.mark.parametrize("cuda", [False, True])
def test_resolve_device_reads_none_and_auto_alike(monkeypatch, cuda):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    assert resolve_device(None) == resolve_device("auto") == torch.device("cuda" if cuda else "cpu")
    assert resolve_device("cpu") == torch.device("cpu")


def _flat_index(n: int = 20, d: int = 8) -> faiss.Index:
    x = np.random.default_rng(0).standard_normal((n, d)).astype(np.float32)
    index = faiss.IndexFlatIP(d)
    index.add(x / np.linalg.norm(x, axis=1, keepdims=True))
    return index


@pytest.mark.parametrize("cuda", [False, True])
def test_auto_backend_is_the_same_for_none_and_auto(monkeypatch, cuda):
    made = []

    class RecordingTorchBackend:  # stands in for the CUDA backend on a machine without one
        name = "torch"

        def __init__(self, vectors, device, precision):
            made.append(torch.device(device))

    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(faiss, "get_num_gpus", lambda: 0)
    monkeypatch.setattr(backends, "TorchBackend", RecordingTorchBackend)
    index = _flat_index()
    names = [backends.make_backend(index, "auto", device).name for device in (None, "auto")]
    assert names[0] == names[1] == ("torch" if cuda else "faiss-cpu")
    assert made == ([torch.device("cuda")] * 2 if cuda else [])
    assert backends.make_backend(index, "auto", "cpu").name == "faiss-cpu"  # an explicit CPU stays on the CPU


def test_generator_puts_the_vlm_on_the_same_device_for_none_and_auto(tmp_path, monkeypatch):
    torch.manual_seed(0)
    vlm = VLM.create(12, [{"spec": "patch:3"}], lm_overrides=UNIT_LM, corpus=["the heart is normal."])
    vlm.save(tmp_path / "v", encoders=[FrozenPatchEncoder(3, 32, 8, 12)])
    asked = []
    real_load = VLM.load

    def recording_load(path, device=None, trainable=False):
        asked.append(torch.device(device))
        return real_load(path, device="cpu", trainable=trainable)

    monkeypatch.setattr(generate_module.VLM, "load", staticmethod(recording_load))
    for cuda in (False, True):
        monkeypatch.setattr(torch.cuda, "is_available", lambda cuda=cuda: cuda)
        for device in (None, "auto"):
            generate_module.Generator(tmp_path / "v", options=GeneratorOptions(box_source="lm"), device=device)
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert asked == [cpu, cpu, cuda, cuda]


def test_an_unknown_device_name_is_a_usage_error():
    from retrieval.device import resolve_device
    from retrieval.errors import UsageError

    with pytest.raises(UsageError, match="unknown device 'tpu'"):
        resolve_device("tpu")
    assert resolve_device("cpu").type == "cpu"
