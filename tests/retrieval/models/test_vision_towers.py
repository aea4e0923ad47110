"""Image towers by name (`timm:`, `hf:`): tiny random models of each class saved as folders load with their native
size and normalisation and their own weights, give features and tokens of the right shapes, save and reload
offline, and run through `cxr train` and `cxr index build`."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from train_manifest import make_manifest

from cli.main import main
from retrieval.errors import ModelLoadError
from retrieval.models import load_model
from retrieval.models.saved_model import fingerprint_state
from retrieval.models.vision_towers import VISION_DIR


@pytest.fixture(scope="module")
def tiny_towers(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, torch.nn.Module]]:
    """{kind: (folder, the source model)}: a timm DINOv2 ViT saved with its pretrained_cfg (timm's save_for_hf),
    an HF Dinov2Model (RAD-DINO's class) with a BitImageProcessor, and a two-tower SiglipModel (MedSigLIP's
    layout) with a SiglipImageProcessor."""
    import timm
    from timm.models import save_for_hf
    from transformers import (
        BitImageProcessor,
        Dinov2Config,
        Dinov2Model,
        SiglipConfig,
        SiglipImageProcessor,
        SiglipModel,
    )

    root = tmp_path_factory.mktemp("towers")
    torch.manual_seed(0)
    small = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)
    vit = timm.create_model(
        "vit_small_patch14_dinov2", pretrained=False, num_classes=0, img_size=56, depth=2, embed_dim=32, num_heads=2
    ).eval()
    save_for_hf(vit, root / "timm")
    dino = Dinov2Model(Dinov2Config(image_size=56, patch_size=14, **small)).eval()
    dino.save_pretrained(root / "dino")
    BitImageProcessor(
        size={"shortest_edge": 56},
        crop_size={"height": 56, "width": 56},
        image_mean=[0.53, 0.53, 0.53],
        image_std=[0.3, 0.3, 0.3],
    ).save_pretrained(root / "dino")
    siglip = SiglipModel(
        SiglipConfig(
            vision_config=dict(image_size=64, patch_size=16, **small),
            text_config=dict(vocab_size=100, bos_token_id=1, eos_token_id=2, **small),
        )
    ).eval()
    siglip.save_pretrained(root / "siglip")
    SiglipImageProcessor(size={"height": 64, "width": 64}).save_pretrained(root / "siglip")
    return {
        "timm": (root / "timm", vit),
        "dino": (root / "dino", dino),
        "siglip": (root / "siglip", siglip.vision_model),
    }


# kind -> (tower name prefix, native size, mean, std, patch tokens)
NATIVE = {
    "timm": ("timm:", 56, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225), 16),
    "dino": ("hf:", 56, (0.53,) * 3, (0.3,) * 3, 16),
    "siglip": ("hf:", 64, (0.5,) * 3, (0.5,) * 3, 16),
}


def _reference_pooled(kind: str, source: torch.nn.Module, pixels: torch.Tensor) -> torch.Tensor:
    """The source model's own pooled output: timm's forward, DINOv2's normed class token, SigLIP's pooler."""
    with torch.no_grad():
        if kind == "timm":
            return source(pixels)
        return source(pixel_values=pixels).pooler_output


@pytest.mark.parametrize("kind", list(NATIVE))
def test_tower_loads_native_preprocessing_weights_and_shapes(tiny_towers, kind: str) -> None:
    folder, source = tiny_towers[kind]
    prefix, size, mean, std, n_tokens = NATIVE[kind]
    model = load_model(f"{prefix}{folder}", device="cpu")
    tf = model.image_transform()
    assert model.image_size == size and tf.size == size
    np.testing.assert_allclose(tf.mean, mean, atol=1e-6)
    np.testing.assert_allclose(tf.std, std, atol=1e-6)
    img = np.random.default_rng(0).random((90, 60)).astype(np.float32)  # portrait: padded left and right
    pixels = tf(img)[None]
    assert pixels.shape == (1, 3, size, size)
    np.testing.assert_allclose(pixels[0, :, 0, 0].numpy(), -np.array(mean) / np.array(std), atol=1e-5)  # black pad
    with torch.no_grad():
        feats = model.image_features(pixels)
        tokens = model.image_tokens(pixels)
    assert feats.shape == (1, 32) and tokens.shape == (1, n_tokens, 32)
    torch.testing.assert_close(feats, _reference_pooled(kind, source, pixels), atol=1e-5, rtol=1e-4)
    emb = model.encode_images([img, img[::-1].copy()])
    assert emb.shape == (2, model.embed_dim) and np.allclose(np.linalg.norm(emb, axis=1), 1, atol=1e-5)


@pytest.mark.parametrize("kind", ["timm", "siglip"])
def test_saved_tower_model_reloads_offline_without_the_source(tiny_towers, tmp_path: Path, kind: str) -> None:
    folder, _ = tiny_towers[kind]
    prefix = NATIVE[kind][0]
    model = load_model(f"{prefix}{folder}", device="cpu")
    out = model.save(tmp_path / "saved")
    files = sorted(p.name for p in (out / VISION_DIR).iterdir())
    assert "config.json" in files and not any(f.endswith((".safetensors", ".bin")) for f in files)
    img = np.random.default_rng(1).random((64, 64)).astype(np.float32)
    again = load_model(out, device="cpu")
    assert again.fingerprint == model.fingerprint and again.image_size == model.image_size
    np.testing.assert_allclose(again.encode_images([img]), model.encode_images([img]), atol=1e-5)
    assert main(["models", "verify", str(out)]) == 0


@pytest.mark.parametrize("kind", list(NATIVE))
def test_prefetch_and_verify_cover_each_kind(tiny_towers, tmp_path: Path, capsys, kind: str) -> None:
    folder, _ = tiny_towers[kind]
    name = f"{NATIVE[kind][0]}{folder}"
    assert main(["models", "prefetch", name, "--to", str(tmp_path / "p"), "--json"]) == 0
    capsys.readouterr()
    assert main(["models", "verify", str(tmp_path / "p"), "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["ok"] and res["fingerprint"] == load_model(name, device="cpu").fingerprint
    assert main(["models", "info", name, "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["image_tower"] == name and info["image_size"] == NATIVE[kind][1]


def test_bad_tower_names_are_one_clear_error(tiny_towers, tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="timm:no_such_net"):
        load_model("timm:no_such_net", device="cpu")
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "config.json").write_text(json.dumps({"model_type": "dinov2", "hidden_size": 32}))
    with pytest.raises(ModelLoadError, match="no image processor"):
        load_model(f"hf:{bare}", device="cpu")


def test_train_and_index_build_run_on_a_tower_by_name(tiny_towers, tmp_path: Path, capsys) -> None:
    """`cxr train` fine-tunes the tower's last block on `hf:FOLDER`, and `cxr index build` runs on the result."""
    folder, _ = tiny_towers["dino"]
    manifest = make_manifest(tmp_path / "data", 24)
    out = tmp_path / "run"
    args = ["train", "-m", str(manifest), "--out", str(out), "--model", f"hf:{folder}", "--image-tower", "train"]
    assert main([*args, "--unfreeze-last", "1", "--epochs", "1", "--batch-size", "8", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert len(info["history"]) == 1 and "last 1 blocks" in str(info["towers"])
    tower = load_model(out, device="cpu").towers()["image"]
    before = load_model(f"hf:{folder}", device="cpu").towers()["image"]
    assert fingerprint_state(tower.state_dict()) != fingerprint_state(before.state_dict())  # the tower trained
    idx = tmp_path / "idx"
    assert main(["index", "build", "-m", str(manifest), "--model", str(out), "--out", str(idx), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["count"] == 24
