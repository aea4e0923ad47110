"""Model registry, towers, projector heads, save/load and fingerprint. Tiny configs; nothing is downloaded."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from tiny_model import MINILM, TEXTS, TINY_CLIP_CFG, TINY_HF_CFG, tiny_model

from retrieval.errors import ModelLoadError
from retrieval.models import CXRModel, list_models, load_model, resolve
from retrieval.models.registry import resolve_package_path


@pytest.fixture(scope="module")
def cxr_tiny() -> CXRModel:
    return load_model("cxr-tiny", device="cpu")


@pytest.fixture(scope="module")
def saved_hf(tmp_path_factory) -> tuple[CXRModel, Path]:
    model = tiny_model(hf_text=True)
    folder = tmp_path_factory.mktemp("saved") / "model"
    model.save(folder)
    return model, folder


def copy_saved(folder: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "copy"
    shutil.copytree(folder, dst)
    return dst


# ---- names ---------------------------------------------------------------------------------------------------
def test_list_models_has_the_bundled_configs():
    assert {"cxr-tiny", "biomedclip", "biomedclip-arch"} <= set(list_models())


def test_unknown_name_lists_known_names():
    with pytest.raises(ModelLoadError) as e:
        load_model("no-such-model")
    msg = str(e.value)
    assert "no-such-model" in msg and "cxr-tiny" in msg and "biomedclip" in msg and "hf-hub:" in msg


def test_biomedclip_resolves_to_the_hub_checkpoint():
    spec = resolve("biomedclip")
    assert spec.kind == "hf-hub"
    assert spec.hub_id == "microsoft/BiomedCLIP-PubMedBERT_256-vit_base_patch16_224"
    assert spec.projector["embed_dim"] == 512
    direct = resolve("hf-hub:microsoft/BiomedCLIP-PubMedBERT_256-vit_base_patch16_224")
    assert (direct.kind, direct.hub_id) == ("hf-hub", spec.hub_id)


def test_biomedclip_without_offline_cache_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelLoadError) as e:
        load_model("biomedclip", device="cpu", cache_dir=str(tmp_path))
    msg = str(e.value)
    assert "microsoft/BiomedCLIP-PubMedBERT_256-vit_base_patch16_224" in msg
    assert "docs/models.md" in msg and "\n" not in msg


def test_biomedclip_goes_through_open_clip_with_the_hub_name(monkeypatch):
    import open_clip
    import open_clip.factory

    hub = "microsoft/BiomedCLIP-PubMedBERT_256-vit_base_patch16_224"
    calls = {}

    def fake_config(model_id, cache_dir=None):
        calls["config"] = (model_id, cache_dir)
        return {"model_cfg": resolve("biomedclip-arch").model_cfg}

    def fake_create(name, **kwargs):
        calls["create"] = (name, kwargs)
        raise RuntimeError("no network in this test")

    monkeypatch.setattr(open_clip.factory, "_get_hf_config", fake_config)
    monkeypatch.setattr(open_clip, "create_model", fake_create)
    with pytest.raises(ModelLoadError, match="no network in this test"):
        load_model("biomedclip", device="cpu", cache_dir="/tmp/hf-cache")
    assert calls["config"] == (hub, "/tmp/hf-cache")
    name, kwargs = calls["create"]
    assert name == f"hf-hub:{hub}"
    assert kwargs["require_pretrained"] and kwargs["force_custom_text"] and kwargs["cache_dir"] == "/tmp/hf-cache"
    assert "text_cfg" not in kwargs  # the hub's own text config (BiomedBERT from the cache) is used as is


def test_biomedclip_arch_config_matches_biomedclip():
    spec = resolve("biomedclip-arch")
    cfg = spec.model_cfg
    assert cfg["embed_dim"] == 512
    assert cfg["vision_cfg"]["timm_model_name"] == "vit_base_patch16_224"
    assert cfg["vision_cfg"]["image_size"] == 224
    assert cfg["text_cfg"]["context_length"] == 256
    assert cfg["text_cfg"]["hf_pooler_type"] == "cls_last_hidden_state_pooler"
    bert = spec.text_hf_config
    assert (bert["hidden_size"], bert["num_hidden_layers"], bert["num_attention_heads"]) == (768, 12, 12)
    # the substituted MiniLM WordPiece tokenizer has the same vocabulary size as PubMedBERT
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(spec.tokenizer_local))
    assert len(tok) == bert["vocab_size"] == 30522


@pytest.mark.slow
def test_biomedclip_arch_builds_offline_with_random_weights():
    model = load_model("biomedclip-arch", device="cpu")
    n_vision = sum(p.numel() for p in model.clip.visual.parameters())
    n_text = sum(p.numel() for p in model.clip.text.parameters())
    assert 85e6 < n_vision < 88e6  # ViT-B/16 (86M) + projection
    assert 108e6 < n_text < 112e6  # BERT-base without pooler (109M) + MLP projection
    pixels = torch.zeros(1, 3, 224, 224)
    assert model.image_tokens(pixels).shape == (1, 196, 768)
    assert model.encode_texts(["pleural effusion"]).shape == (1, 512)


# ---- cxr-tiny --------------------------------------------------------------------------------------------------
def test_cxr_tiny_shapes(cxr_tiny):
    assert cxr_tiny.name == "cxr-tiny" and cxr_tiny.embed_dim == 256 and cxr_tiny.trains_image_tower
    pixels = torch.randn(2, 3, cxr_tiny.image_size, cxr_tiny.image_size)
    tokens = cxr_tiny.image_tokens(pixels)
    assert tokens.shape == (2, (cxr_tiny.image_size // 16) ** 2, 192)
    assert cxr_tiny.image_features(pixels).shape == (2, 384)
    assert cxr_tiny.context_length <= 128


def test_cxr_tiny_text_tower_is_the_pretrained_minilm(cxr_tiny):
    from sentence_transformers import SentenceTransformer

    st = SentenceTransformer(str(resolve_package_path(MINILM)), device="cpu")
    want = st.encode(TEXTS, convert_to_numpy=True, normalize_embeddings=True)
    with torch.no_grad():
        feats = cxr_tiny.text_features(cxr_tiny.tokenize(TEXTS))
    got = torch.nn.functional.normalize(feats, dim=-1).numpy()
    np.testing.assert_allclose(got, want, atol=1e-5)


def test_tokenize_matches_the_hf_tokenizer_and_trims_padding(cxr_tiny):
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(str(resolve_package_path(MINILM)))
    tokens = cxr_tiny.tokenize(TEXTS)
    ids = [hf(t)["input_ids"] for t in TEXTS]
    assert tokens.shape == (2, max(map(len, ids)))
    for row, want in zip(tokens.tolist(), ids, strict=True):
        assert row[: len(want)] == want and all(v == 0 for v in row[len(want) :])
    long = cxr_tiny.tokenize(["effusion " * 400])
    assert long.shape[1] == cxr_tiny.context_length


# ---- projector heads and freezing --------------------------------------------------------------------------
def test_projector_outputs_unit_vectors_and_one_logit():
    model = tiny_model()
    feats = torch.randn(5, 24) * 7
    emb = model.project_images(feats)
    assert emb.shape == (5, 16) and emb.dtype == torch.float32
    np.testing.assert_allclose(emb.norm(dim=-1).detach().numpy(), 1.0, atol=1e-6)
    logits = model.abnormal_logit(emb)
    assert logits.shape == (5,)
    ref = emb @ model.projector.abnormal.weight[0] + model.projector.abnormal.bias[0]
    torch.testing.assert_close(logits, ref)
    # standardise (running statistics), Linear-GELU-Linear, then L2 normalisation (naive reference)
    net = model.projector.image.net
    bn = net[0]
    x = (feats - bn.running_mean) / torch.sqrt(bn.running_var + bn.eps)
    h = torch.nn.functional.gelu(x @ net[1].weight.T + net[1].bias)
    ref = h @ net[4].weight.T + net[4].bias
    torch.testing.assert_close(emb, ref / ref.norm(dim=-1, keepdim=True))


def test_freeze_and_unfreeze_last():
    model = tiny_model(hf_text=True)
    model.freeze_towers()
    assert not any(p.requires_grad for p in model.clip.parameters())
    assert all(p.requires_grad for p in model.projector.parameters())
    counts = model.unfreeze_last(1)
    assert counts == {"image": 1, "text": 1}
    vis = model.clip.visual
    assert all(p.requires_grad for p in vis.transformer.resblocks[-1].parameters())
    assert not any(p.requires_grad for p in vis.transformer.resblocks[0].parameters())
    assert not vis.conv1.weight.requires_grad and not vis.positional_embedding.requires_grad
    assert vis.proj.requires_grad and vis.ln_post.weight.requires_grad
    bert = model.clip.text.transformer
    assert all(p.requires_grad for p in bert.encoder.layer[-1].parameters())
    assert not any(p.requires_grad for p in bert.encoder.layer[0].parameters())
    assert not any(p.requires_grad for p in bert.embeddings.parameters())
    assert all(p.requires_grad for p in model.clip.text.proj.parameters())
    model.unfreeze_last(0)
    assert not any(p.requires_grad for p in model.clip.parameters())


# ---- fingerprint, save and load -----------------------------------------------------------------------------
def test_fingerprint_is_stable_and_follows_every_weight():
    model = tiny_model()
    fp = model.fingerprint
    assert fp == model.fingerprint and len(fp) == 64
    torch.manual_seed(123)
    state = torch.random.get_rng_state()
    assert tiny_model().fingerprint == fp  # built from a fixed seed: same weights
    assert torch.equal(torch.random.get_rng_state(), state)  # and the caller's RNG is untouched
    assert tiny_model(seed=1).fingerprint != fp
    with torch.no_grad():
        model.clip.visual.transformer.resblocks[0].mlp.c_fc.bias[3] += 1e-3
    fp2 = model.fingerprint
    assert fp2 != fp
    with torch.no_grad():
        model.projector.text.net[4].weight[0, 0] += 1e-3
    fp3 = model.fingerprint
    assert fp3 not in (fp, fp2)
    with torch.no_grad():  # the standardiser's running statistics are weights too
        model.projector.image.net[0].running_mean[0] += 1e-3
    assert model.fingerprint not in (fp, fp2, fp3)


def test_save_load_round_trip(saved_hf):
    model, folder = saved_hf
    names = {p.name for p in folder.iterdir()}
    assert {
        "open_clip_config.json",
        "open_clip_model.safetensors",
        "projector.json",
        "projector.safetensors",
        "model_info.json",
        "text",
    } <= names
    assert not [p for p in folder.rglob("*") if p.suffix in (".bin", ".pt", ".pth", ".pkl")]
    info = json.loads((folder / "model_info.json").read_text())
    assert info["name"] == "tiny-hf" and info["embed_dim"] == 16 and info["fingerprint"] == model.fingerprint
    assert {"torch", "open_clip", "transformers"} <= set(info["versions"]) and info["created"]
    loaded = load_model(folder, device="cpu")
    assert loaded.fingerprint == model.fingerprint
    images = [np.random.default_rng(i).random((40, 30), dtype=np.float32) for i in range(3)]
    np.testing.assert_array_equal(loaded.encode_images(images), model.encode_images(images))
    np.testing.assert_array_equal(loaded.encode_texts(TEXTS), model.encode_texts(TEXTS))
    assert torch.equal(loaded.tokenize(TEXTS), model.tokenize(TEXTS))


def test_cxr_tiny_round_trip_is_self_contained(cxr_tiny, tmp_path):
    cxr_tiny.save(tmp_path / "m")
    text = tmp_path / "m" / "text"
    assert (text / "config.json").is_file() and not list(text.glob("*.safetensors"))  # MiniLM weights in towers
    loaded = load_model(tmp_path / "m", device="cpu")
    assert loaded.fingerprint == cxr_tiny.fingerprint and loaded.name == "cxr-tiny" and loaded.trains_image_tower
    np.testing.assert_array_equal(loaded.encode_texts(TEXTS), cxr_tiny.encode_texts(TEXTS))


def _rewrite(path: Path, change) -> None:
    from safetensors.torch import load_file, save_file

    state = load_file(str(path))
    change(state)
    save_file(state, str(path))


def _missing_key(state):
    state.pop(sorted(state)[0])


def _extra_key(state):
    state["surprise.weight"] = torch.zeros(2)


def _bad_shape(state):
    key = next(k for k in sorted(state) if state[k].ndim == 2)
    state[key] = torch.zeros(state[key].shape[0] + 1, state[key].shape[1])


def _changed_value(state):
    key = sorted(state)[-1]
    state[key] = state[key] + 1.0


@pytest.mark.parametrize("fname", ["open_clip_model.safetensors", "projector.safetensors"])
@pytest.mark.parametrize(
    "change,expect",
    [(_missing_key, "missing keys"), (_extra_key, "unexpected keys"), (_bad_shape, "shape mismatch")],
)
def test_bad_weights_raise_naming_the_file(saved_hf, tmp_path, fname, change, expect):
    folder = copy_saved(saved_hf[1], tmp_path)
    _rewrite(folder / fname, change)
    with pytest.raises(ModelLoadError) as e:
        load_model(folder, device="cpu")
    assert fname in str(e.value) and expect in str(e.value)


@pytest.mark.parametrize("fname", ["open_clip_model.safetensors", "projector.safetensors"])
def test_missing_or_corrupt_weights_file(saved_hf, tmp_path, fname):
    folder = copy_saved(saved_hf[1], tmp_path)
    (folder / fname).unlink()
    with pytest.raises(ModelLoadError, match=f"{fname}: weights file missing"):
        load_model(folder, device="cpu")
    data = (saved_hf[1] / fname).read_bytes()
    (folder / fname).write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelLoadError, match=f"{fname}: unreadable safetensors"):
        load_model(folder, device="cpu")


def test_changed_weights_fail_the_recorded_fingerprint(saved_hf, tmp_path):
    folder = copy_saved(saved_hf[1], tmp_path)
    _rewrite(folder / "projector.safetensors", _changed_value)
    with pytest.raises(ModelLoadError, match="model_info.json.*fingerprint"):
        load_model(folder, device="cpu")


def test_bad_configs_raise(saved_hf, tmp_path):
    folder = copy_saved(saved_hf[1], tmp_path)
    (folder / "projector.json").write_text("{not json")
    with pytest.raises(ModelLoadError, match="projector.json: not valid JSON"):
        load_model(folder, device="cpu")
    (folder / "projector.json").write_text(json.dumps({"image_dim": 24, "text_dim": 24, "colour": "red"}))
    with pytest.raises(ModelLoadError, match="bad projector config"):
        load_model(folder, device="cpu")
    with pytest.raises(ModelLoadError, match="not a model folder"):
        load_model(tmp_path, device="cpu")
    with pytest.raises(ModelLoadError, match="local-dir model folder not found"):
        load_model(f"local-dir:{tmp_path / 'nowhere'}")


# ---- open_clip local-dir folders ------------------------------------------------------------------------------
def _write_open_clip_folder(folder: Path, model_cfg: dict, state: dict) -> None:
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    cfg = {"model_cfg": model_cfg, "preprocess_cfg": {"mean": [0.4] * 3, "std": [0.3] * 3}}
    (folder / "open_clip_config.json").write_text(json.dumps(cfg))
    save_file({k: v.contiguous() for k, v in state.items()}, str(folder / "open_clip_model.safetensors"))


def test_local_dir_open_clip_folder(tmp_path):
    import open_clip
    from open_clip.model import CLIP

    torch.manual_seed(3)
    ref = CLIP(**TINY_CLIP_CFG).eval()  # a standard CLIP layout: the loader converts it to custom-text
    _write_open_clip_folder(tmp_path / "oc", TINY_CLIP_CFG, ref.state_dict())
    model = load_model(f"local-dir:{tmp_path / 'oc'}", device="cpu")
    assert list(model.image_transform().mean) == [0.4] * 3
    pixels = torch.randn(2, 3, 32, 32)
    tok = open_clip.get_tokenizer("ViT-B-32", context_length=16)(TEXTS)
    with torch.no_grad():
        torch.testing.assert_close(model.image_features(pixels), ref.encode_image(pixels))
        torch.testing.assert_close(model.text_features(tok), ref.encode_text(tok))
    assert model.encode_texts(TEXTS).shape == (2, 24)


def test_local_dir_with_mismatched_weights(tmp_path):
    from open_clip.model import CLIP

    state = CLIP(**TINY_CLIP_CFG).state_dict()
    state.pop("visual.proj")
    _write_open_clip_folder(tmp_path / "oc", TINY_CLIP_CFG, state)
    with pytest.raises(ModelLoadError) as e:
        load_model(f"local-dir:{tmp_path / 'oc'}", device="cpu")
    msg = str(e.value)
    assert str(tmp_path / "oc") in msg and "state_dict" in msg and "docs/models.md" not in msg


def test_local_dir_with_hf_text_needs_a_local_copy_or_cache(tmp_path):
    hf_model = tiny_model(hf_text=True)
    _write_open_clip_folder(tmp_path / "oc", TINY_HF_CFG, hf_model.clip.state_dict())
    # the text config names a hub model that is not in any cache: a clear error, no download
    with pytest.raises(ModelLoadError) as e:
        load_model(f"local-dir:{tmp_path / 'oc'}", device="cpu")
    assert "docs/models.md" in str(e.value)
    # with the text model's config and tokenizer in text/, the same folder loads offline
    text = tmp_path / "oc" / "text"
    text.mkdir()
    hf_model.clip.text.config.save_pretrained(text)
    hf_model.tokenizer.tokenizer.save_pretrained(text)
    model = load_model(f"local-dir:{tmp_path / 'oc'}", device="cpu")
    tokens = model.tokenize(TEXTS)
    with torch.no_grad():
        torch.testing.assert_close(model.text_features(tokens), hf_model.text_features(tokens))
