"""`cxr models list|info|verify|export|unpack|relink` and the saved folder's plain-open_clip offline contract."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from repo_paths import REPO
from run_python import run_python
from tiny_model import TEXTS, tiny_model

from cli.main import main
from retrieval.models import load_model
from retrieval.models.bundle import CHECKSUMS_FILE, linked_text_path, read_checksums


def run_cli(capsys: pytest.CaptureFixture, *args: str) -> tuple[int, str, str]:
    capsys.readouterr()
    code = main(list(args))
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """A tiny model with an HF text tower, saved as `cxr train` saves (folder, fingerprint)."""
    model = tiny_model(hf_text=True)
    folder = tmp_path_factory.mktemp("saved") / "model"
    model.save(folder)
    return folder, model.fingerprint


def copy_of(folder: Path, tmp_path: Path) -> Path:
    dest = tmp_path / "copy"
    shutil.copytree(folder, dest)
    return dest


def test_save_writes_checksums_and_links_its_own_text_copy(saved: tuple[Path, str]) -> None:
    folder, fp = saved
    listed = read_checksums(folder)
    assert {"open_clip_model.safetensors", "projector.safetensors", "model_info.json", "text/config.json"} <= set(
        listed
    )
    assert linked_text_path(folder) == str((folder / "text").resolve())
    assert (folder / "tokenizer_config.json").is_file()  # plain open_clip's get_tokenizer reads the root
    assert load_model(folder, device="cpu").fingerprint == fp  # the loader ignores the path; fingerprint unchanged


OFFLINE = r"""
import json, sys
import numpy as np, torch, open_clip
oc, _, preprocess = open_clip.create_model_and_transforms("local-dir:" + sys.argv[1])
tok = open_clip.get_tokenizer("local-dir:" + sys.argv[1])
oc.eval()
px = torch.from_numpy(np.load(sys.argv[3]))
with torch.no_grad():
    np.savez(sys.argv[2], img=oc.encode_image(px).numpy(), txt=oc.encode_text(tok(json.loads(sys.argv[4]))).numpy())
"""


@pytest.mark.slow
def test_saved_folder_loads_in_plain_open_clip_offline(saved: tuple[Path, str], tmp_path: Path) -> None:
    """open_clip's own create_model_and_transforms + get_tokenizer, HF_HUB_OFFLINE=1, an empty HF cache, the folder
    moved and relinked: the same tower outputs as this project's loader."""
    folder = copy_of(saved[0], tmp_path)
    assert main(["models", "relink", str(folder)]) == 0
    px = np.random.default_rng(1).standard_normal((2, 3, 32, 32)).astype(np.float32)
    np.save(tmp_path / "px.npy", px)
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    env |= {"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "empty-hf"), "PYTHONPATH": str(REPO)}
    run_python(OFFLINE, folder, tmp_path / "o.npz", tmp_path / "px.npy", json.dumps(TEXTS), env=env, cwd=tmp_path)
    got = np.load(tmp_path / "o.npz")
    ours = load_model(folder, device="cpu")
    with torch.no_grad():
        np.testing.assert_allclose(got["img"], ours.image_features(torch.from_numpy(px)).numpy(), atol=1e-5)
        np.testing.assert_allclose(got["txt"], ours.text_features(ours.tokenize(TEXTS)).numpy(), atol=1e-5)


def test_verify_ok_builds_and_encodes(saved: tuple[Path, str], capsys: pytest.CaptureFixture) -> None:
    folder, fp = saved
    code, out, _ = run_cli(capsys, "models", "verify", str(folder), "--json")
    res = json.loads(out)
    assert code == 0 and res["ok"] and res["problems"] == []
    assert res["fingerprint"] == fp and res["checked"] == len(read_checksums(folder))
    assert abs(res["image_norm"] - 1) < 1e-4 and abs(res["text_norm"] - 1) < 1e-4


@pytest.mark.parametrize("victim", ["open_clip_model.safetensors", "text/config.json", "projector.json"])
def test_verify_names_an_altered_byte(
    saved: tuple[Path, str], tmp_path: Path, capsys: pytest.CaptureFixture, victim: str
) -> None:
    folder = copy_of(saved[0], tmp_path)
    data = bytearray((folder / victim).read_bytes())
    data[len(data) // 2] ^= 0x20
    (folder / victim).write_bytes(bytes(data))
    code, out, _ = run_cli(capsys, "models", "verify", str(folder))
    assert code == 1
    assert f"FAIL {victim}: sha256 differs" in out


def test_verify_names_a_missing_file_and_a_missing_list(
    saved: tuple[Path, str], tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    folder = copy_of(saved[0], tmp_path)
    (folder / "projector.safetensors").unlink()
    code, out, _ = run_cli(capsys, "models", "verify", str(folder))
    assert code == 1 and "FAIL projector.safetensors: missing" in out
    (folder / CHECKSUMS_FILE).unlink()
    code, out, _ = run_cli(capsys, "models", "verify", str(folder))
    assert code == 1 and f"{CHECKSUMS_FILE}: no checksum list" in out


def test_copied_folder_verifies_and_loads_then_relinks_for_open_clip(saved: tuple[Path, str], tmp_path: Path, capsys):
    folder = copy_of(saved[0], tmp_path)  # still names the original folder's text/
    shutil.rmtree(saved[0] / "text")  # the original's text tower is gone: the copy must use its own
    try:
        code, out, _ = run_cli(capsys, "models", "verify", str(folder))
        assert code == 0 and "built and encoded" in out and f"fingerprint {saved[1][:16]}" in out, out
        assert "note:" in out and "cxr models relink" in out  # plain open_clip would follow the old path
        assert main(["models", "relink", str(folder)]) == 0
        code, out, _ = run_cli(capsys, "models", "verify", str(folder), "--no-encode")
        assert code == 0 and "note:" not in out, out  # relinking changes the path only: checksums still hold
    finally:
        shutil.copytree(folder / "text", saved[0] / "text")


def test_export_unpack_round_trip(saved: tuple[Path, str], tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    folder, fp = saved
    (folder / "text_features.safetensors").write_bytes(b"a cache: never exported")
    try:
        code, out, _ = run_cli(capsys, "models", "export", str(folder), "--to", str(tmp_path / "m.tar"), "--json")
    finally:
        (folder / "text_features.safetensors").unlink()
    assert code == 0 and json.loads(out)["bytes"] > 0
    code, out, _ = run_cli(capsys, "models", "unpack", str(tmp_path / "m.tar"), "--to", str(tmp_path / "elsewhere"))
    assert code == 0, out
    new = tmp_path / "elsewhere" / folder.name
    assert not (new / "text_features.safetensors").exists()
    assert linked_text_path(new) == str((new / "text").resolve())
    code, out, _ = run_cli(capsys, "models", "verify", str(new), "--json")
    assert code == 0 and json.loads(out)["fingerprint"] == fp


def test_export_refuses_an_altered_folder(saved: tuple[Path, str], tmp_path: Path, capsys) -> None:
    folder = copy_of(saved[0], tmp_path)
    (folder / "projector.json").write_text("{}")
    code, _, err = run_cli(capsys, "models", "export", str(folder), "--to", str(tmp_path / "m.tar"))
    assert code == 1 and "projector.json" in err and not (tmp_path / "m.tar").exists()


def test_unpack_refuses_path_escapes(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    import io
    import tarfile

    with tarfile.open(tmp_path / "evil.tar", "w") as tar:
        info = tarfile.TarInfo("m/../../escaped.txt")
        info.size = 1
        tar.addfile(info, io.BytesIO(b"x"))
    code, _, err = run_cli(capsys, "models", "unpack", str(tmp_path / "evil.tar"), "--to", str(tmp_path / "u"))
    assert code == 1 and "cannot unpack" in err
    assert not (tmp_path / "escaped.txt").exists()


def test_list_and_info(saved: tuple[Path, str], capsys: pytest.CaptureFixture) -> None:
    code, out, _ = run_cli(capsys, "models", "list", "--json")
    rows = {r["name"]: r for r in json.loads(out)}
    assert code == 0
    assert all(rows[name]["offline"] is True for name in ("cxr-tiny", "cxr-small", "cxr-base"))
    assert {"biomedclip", "biomedclip-arch", "chexbert", "radgraph"} <= set(rows)
    folder, fp = saved
    code, out, _ = run_cli(capsys, "models", "info", str(folder), "--json")
    info = json.loads(out)
    assert code == 0 and info["fingerprint"] == fp and info["kind"] == "saved"
    sizes = {f["path"]: f["bytes"] for f in info["files"]}
    assert sizes["open_clip_model.safetensors"] == (folder / "open_clip_model.safetensors").stat().st_size
    assert info["embed_dim"] == 16 and info["preprocess"]["resize_mode"] == "longest"


def test_info_and_verify_bad_input_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    code, _, err = run_cli(capsys, "models", "info", "no-such-model")
    assert code == 1 and err.startswith("error: unknown model 'no-such-model'") and err.count("\n") == 1
    code, _, err = run_cli(capsys, "models", "verify", str(tmp_path / "nope"))
    assert code == 1 and "not a folder" in err


@pytest.mark.slow
def test_prefetch_metric_folders_through_loopback_hub(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """`cxr models prefetch chexbert|radgraph` through the real huggingface_hub client against a loopback hub (no
    metric library needed: the files are placeholders). The checkpoints and the BERTs' config/tokenizer arrive in the
    layout report_metrics reads, RadGraph's archive is unpacked unchanged, no BERT weights are fetched, and the
    folders verify (also with the `.lock` file radgraph leaves in its vocabulary)."""
    import io
    import tarfile

    from loopback_hub import prefetch_through_hub

    from retrieval.models.bundle import CHEXBERT_BERT_REPO, RRG_SCORERS

    bert_id = "test-org/radgraph-bert"
    config = json.dumps(
        {
            "dataset_reader": {"token_indexers": {"bert": {"model_name": bert_id}}},
            "model": {"embedder": {"token_embedders": {"bert": {"model_name": bert_id}}}},
        }
    ).encode()
    archive = io.BytesIO()
    with tarfile.open(fileobj=archive, mode="w:gz") as tar:
        for name, data in {"config.json": config, "weights.th": b"w" * 100, "vocabulary/a.txt": b"x\n"}.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    bert = {"config.json": b'{"model_type": "bert"}', "vocab.txt": b"[PAD]\n", "model.safetensors": b"big"}
    repos = {
        RRG_SCORERS: {"chexbert.pth": b"ckpt", "radgraph-xl.tar.gz": archive.getvalue(), "README.md": b"-"},
        CHEXBERT_BERT_REPO: dict(bert),
        bert_id: dict(bert),
    }
    dest = tmp_path / "metrics"
    requests = prefetch_through_hub(repos, ("chexbert", "radgraph"), dest, tmp_path / "hf")
    assert not any(r.endswith(("README.md", "model.safetensors")) for r in requests), requests
    assert set(read_checksums(dest / "chexbert")) == {
        "bundle.json",
        "chexbert.pth",
        "bert-base-uncased/config.json",
        "bert-base-uncased/vocab.txt",
    }
    assert set(read_checksums(dest / "radgraph")) == {
        "bundle.json",
        "radgraph-xl/config.json",
        "radgraph-xl/weights.th",
        "radgraph-xl/vocabulary/a.txt",
        "bert/config.json",
        "bert/vocab.txt",
    }
    assert (dest / "radgraph" / "radgraph-xl" / "config.json").read_bytes() == config  # left as shipped
    sources = json.loads((dest / "radgraph" / "bundle.json").read_text())["sources"]
    assert [s["repo"] for s in sources] == [RRG_SCORERS, bert_id]
    (dest / "radgraph" / "radgraph-xl" / "vocabulary" / ".lock").touch()  # what a radgraph load leaves behind
    for name in ("chexbert", "radgraph"):
        code, out, _ = run_cli(capsys, "models", "verify", str(dest / name))
        assert code == 0 and out.rstrip().endswith("OK") and "not in the checksum list" not in out
    (dest / "radgraph" / "radgraph-xl" / "weights.th").write_bytes(b"w" * 99 + b"v")
    code, out, _ = run_cli(capsys, "models", "verify", str(dest / "radgraph"))
    assert code == 1 and "FAIL radgraph-xl/weights.th: sha256 differs" in out
