"""Every cache carries a checksum verified when it is loaded: the feature stores of a model folder, the frozen
token cache, the shared ONNX export of an image tower and training checkpoints (issue 29, item 2). A bad cache is
never used: it is ignored or rebuilt with a warning, a bad checkpoint is refused in one line."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
from torch import nn

from retrieval.errors import CXRError
from retrieval.models import onnx_tower
from retrieval.models.bundle import write_checksums
from retrieval.models.model_status import verify
from retrieval.models.text_features import STORE_FILE, load_store, save_store
from retrieval.models.token_cache import TokenCache
from retrieval.training_checkpoint import Checkpoint

TEXTS = ["No acute disease.", "Right lower lobe pneumonia.", "Small left effusion."]


def _flip(path: Path, at: int | None = None, bit: int = 0x40) -> None:
    """One flipped bit (by default in the last quarter of the file: the tensor data, past any header)."""
    data = bytearray(path.read_bytes())
    at = len(data) - len(data) // 4 if at is None else at
    data[at] ^= bit
    path.write_bytes(bytes(data))


def test_a_flipped_bit_in_the_text_store_is_never_used_and_fails_models_verify(tmp_path, caplog):
    feats = torch.randn(len(TEXTS), 16)
    save_store(tmp_path, TEXTS, feats, tower="abc")
    (tmp_path / "weights.bin").write_bytes(b"w")
    write_checksums(tmp_path)
    assert len(load_store(tmp_path, "abc")) == 3 and verify(tmp_path, encode=False)["ok"]
    _flip(tmp_path / STORE_FILE)
    with caplog.at_level(logging.WARNING):
        assert load_store(tmp_path, "abc") == {}  # the tower runs instead
    assert "checksum" in caplog.text and STORE_FILE in caplog.text
    res = verify(tmp_path, encode=False)
    assert not res["ok"] and any(STORE_FILE in p and "checksum" in p for p in res["problems"])


def test_a_store_without_a_checksum_is_not_trusted(tmp_path):
    from safetensors.torch import save_file

    from retrieval.models.feature_store import text_digests

    digests = torch.from_numpy(text_digests(TEXTS))
    save_file({"sha256": digests, "features": torch.randn(3, 4)}, str(tmp_path / STORE_FILE),
              metadata={"tower": "abc", "precision": "fp32"})  # fmt: skip
    assert load_store(tmp_path, "abc") == {}


def test_a_damaged_token_cache_is_recomputed(tmp_path, caplog):
    paths = []
    for i in range(3):
        p = tmp_path / f"im{i}.png"
        p.write_bytes(bytes([i]))
        paths.append(p)
    cache = TokenCache(tmp_path / "cache", "tower", 8)
    tokens = torch.randn(3, 4, 8)
    cache.add(paths, tokens)
    assert len(TokenCache(tmp_path / "cache", "tower", 8).get(paths)) == 3
    _flip(cache.file)
    with caplog.at_level(logging.WARNING):
        assert TokenCache(tmp_path / "cache", "tower", 8).get(paths) == {}
    assert "checksum" in caplog.text


class _Tower(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.head = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.conv(x).mean(dim=(2, 3)))


@pytest.mark.parametrize("damage", ["bit", "block"])
def test_a_damaged_onnx_export_is_exported_again(tmp_path, monkeypatch, caplog, damage):
    pytest.importorskip("onnxruntime")
    monkeypatch.setenv("CXR_ONNX_DIR", str(tmp_path))
    monkeypatch.setenv("CXR_IMAGE_RUNTIME", "auto")
    monkeypatch.setattr(onnx_tower, "_SESSIONS", {})
    tower = _Tower().requires_grad_(False)
    pixels = torch.rand(2, 3, 16, 16)
    with torch.no_grad():
        want = tower(pixels)
        first = onnx_tower.run(tower, pixels, "features")
    torch.testing.assert_close(first, want, atol=1e-5, rtol=1e-4)
    (export,) = tmp_path.glob("*.onnx")
    if damage == "bit":
        _flip(export, bit=0x08)
    else:
        data = bytearray(export.read_bytes())
        mid = len(data) // 2
        data[mid : mid + 4096] = bytes(255 - b for b in data[mid : mid + 4096])
        export.write_bytes(bytes(data))
    assert verify_exports_problem(tmp_path)
    monkeypatch.setattr(onnx_tower, "_SESSIONS", {})  # a new process
    with torch.no_grad(), caplog.at_level(logging.WARNING):
        again = onnx_tower.run(tower, pixels, "features")
    torch.testing.assert_close(again, want, atol=1e-5, rtol=1e-4)
    assert "checksum" in caplog.text
    assert not verify_exports_problem(tmp_path)


def verify_exports_problem(folder: Path) -> list[str]:
    from retrieval.models.onnx_cache import check_exports

    return check_exports(folder)


def test_a_damaged_checkpoint_is_refused_in_one_line(tmp_path):
    ck = Checkpoint(tmp_path / "ck")

    def folder(path: Path) -> None:
        path.mkdir()
        (path / "a.bin").write_bytes(bytes(range(200)))

    ck.commit({"step": 1}, {"weights": ("w1", lambda p: p.write_bytes(bytes(range(256)))), "model": ("m1", folder)})
    assert ck.state(verify=True)["step"] == 1
    _flip(tmp_path / "ck" / "w1", at=100, bit=0x01)
    with pytest.raises(CXRError, match=r"w1: damaged \(sha256 mismatch.*--fresh") as e:
        ck.state(verify=True)
    assert "\n" not in str(e.value)
    _flip(tmp_path / "ck" / "w1", at=100, bit=0x01)
    _flip(tmp_path / "ck" / "m1" / "a.bin", at=5)
    with pytest.raises(CXRError, match="m1: damaged"):
        ck.state(verify=True)


def test_index_verify_names_a_damaged_feature_cache_of_its_model(tmp_path, capsys):
    from reliability_helpers import meta_frame, unit_vectors

    from cli.main import main
    from index.factory import build_from_vectors
    from index.generations import save_index

    model_dir = tmp_path / "model"
    model_dir.mkdir()
    save_store(model_dir, TEXTS, torch.randn(3, 8), tower="abc")
    images, factory = build_from_vectors(unit_vectors(20, 8))
    reports, _ = build_from_vectors(unit_vectors(20, 8, seed=1))
    info = {"factory": factory, "model": {"name": "m", "fingerprint": "f", "embed_dim": 8, "path": str(model_dir)}}
    save_index(tmp_path / "idx", images, reports, meta_frame(20), info)
    assert main(["index", "verify", str(tmp_path / "idx")]) == 0
    assert "warning" not in capsys.readouterr().err
    _flip(model_dir / STORE_FILE)
    assert main(["index", "verify", str(tmp_path / "idx")]) == 0  # the index itself is whole
    err = capsys.readouterr().err
    assert STORE_FILE in err and "checksum mismatch" in err
