"""Training: a tiny CPU run learns, resume reproduces an uninterrupted run, the feature cache, the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from train_manifest import make_manifest


@pytest.fixture(scope="module")
def small_manifest(tmp_path_factory) -> Path:
    return make_manifest(tmp_path_factory.mktemp("synthetic"), 160)


def _label_precision_at_5(trainer, split: str) -> float:
    from retrieval.evaluate_retrieval import evaluate_embeddings

    items, img, rep = trainer.embed(split)
    return evaluate_embeddings(items, img, rep)["metrics"]["image->report"]["LP@5"]


@pytest.mark.slow
def test_tiny_training_beats_untrained_projector(small_manifest, tmp_path):
    from retrieval.training import TrainConfig, Trainer

    # frozen (random-init) image tower: the projectors alone must learn; keeps the test fast on 2 cores
    config = TrainConfig(
        epochs=15, batch_size=32, lr=3e-3, patience=15, seed=0, image_tower="frozen", show_progress=False
    )
    untrained = Trainer(small_manifest, "cxr-tiny", tmp_path / "zs", config)
    untrained.setup()
    before = _label_precision_at_5(untrained, "test")

    trainer = Trainer(small_manifest, "cxr-tiny", tmp_path / "run", config)
    model = trainer.run().model
    after = _label_precision_at_5(trainer, "test")
    assert after > before + 0.15, (before, after)
    assert after > 0.6, after  # 4 balanced classes: chance is ~0.25

    # the folder is a normal model folder that reloads with the same embeddings
    from retrieval.models import load_model

    info = json.loads((tmp_path / "run" / "train_info.json").read_text())
    assert info["base_model"] == "cxr-tiny" and info["towers"] == {"image": "frozen", "text": "frozen"}
    assert info["best_epoch"] >= 1 and len(info["history"]) == info["epochs_run"]
    reloaded = load_model(tmp_path / "run")
    items, img, _ = trainer.embed("test")
    again = reloaded.encode_images(items.image_paths[:8])
    assert np.allclose(again, model.encode_images(items.image_paths[:8]), atol=1e-5)


class _Kill(Exception):
    pass


def _kill_after_first(epoch: int, state: dict) -> None:
    if epoch == 1:
        raise _Kill


def _final_weights(out: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    state = json.loads((out / "checkpoint" / "state.json").read_text())
    return load_file(str(out / "checkpoint" / state["files"]["weights"]))


@pytest.mark.slow
@pytest.mark.parametrize("image_tower", ["train", "frozen"])
def test_resume_reproduces_uninterrupted_run(tmp_path, image_tower):
    from retrieval.training import train

    manifest = make_manifest(tmp_path / "data", 40)
    kw = dict(epochs=2, batch_size=16, patience=5, image_tower=image_tower, show_progress=False)
    train(manifest, "cxr-tiny", tmp_path / "straight", **kw)
    with pytest.raises(_Kill):
        train(manifest, "cxr-tiny", tmp_path / "killed", on_epoch_end=_kill_after_first, **kw)
    state = json.loads((tmp_path / "killed" / "checkpoint" / "state.json").read_text())
    assert state["epoch"] == 1
    train(manifest, "cxr-tiny", tmp_path / "killed", **kw)  # resumes from epoch 1

    a, b = _final_weights(tmp_path / "straight"), _final_weights(tmp_path / "killed")
    assert a.keys() == b.keys() and len(a) > 2
    assert all(torch.equal(a[k], b[k]) for k in a)
    hist_a = json.loads((tmp_path / "straight" / "train_info.json").read_text())["history"]
    hist_b = json.loads((tmp_path / "killed" / "train_info.json").read_text())["history"]
    assert [h["loss"] for h in hist_a] == [h["loss"] for h in hist_b]
    # a different seed really gives different weights (the comparison above can fail)
    train(manifest, "cxr-tiny", tmp_path / "other", seed=1, **kw)
    c = _final_weights(tmp_path / "other")
    assert not all(torch.equal(a[k], c[k]) for k in a)


@pytest.mark.slow
def test_resume_refuses_a_different_run(tmp_path):
    from retrieval.errors import CXRError
    from retrieval.training import train

    manifest = make_manifest(tmp_path / "data", 40)
    kw = dict(epochs=1, batch_size=16, image_tower="frozen", show_progress=False)
    train(manifest, "cxr-tiny", tmp_path / "run", **kw)
    with pytest.raises(CXRError, match="different run"):
        train(manifest, "cxr-tiny", tmp_path / "run", lr=0.5, **kw)
    train(manifest, "cxr-tiny", tmp_path / "run", lr=0.5, fresh=True, **kw)


@pytest.mark.slow
def test_feature_cache_hits_and_matches_recomputed_features(tmp_path):
    from safetensors.torch import load_file

    from retrieval.training import TrainConfig, Trainer

    manifest = make_manifest(tmp_path / "data", 40)
    config = TrainConfig(epochs=1, batch_size=16, image_tower="frozen", val_split=None, show_progress=False)
    first = Trainer(manifest, "cxr-tiny", tmp_path / "a", config)
    first.run()
    assert first.cache_hits == {"image/train": False, "text/train": False}
    second = Trainer(manifest, "cxr-tiny", tmp_path / "a", config)
    second.run(fresh=True)
    assert second.cache_hits == {"image/train": True, "text/train": True}

    # the cached text features are the tower's features of the reports
    files = sorted((tmp_path / "a" / "feature_cache").glob("text-train-*.safetensors"))
    assert len(files) == 1
    cached = load_file(str(files[0]))["features"]
    model = second.model
    items = second.train_split.items
    with torch.no_grad():
        direct = model.text_features(model.tokenize(items.reports[:5]))
    assert torch.allclose(cached[:5], direct.float(), atol=1e-5)

    # a changed report invalidates the text cache (new key), not the image cache
    df = pd.read_parquet(manifest)
    df.loc[0, "report"] = "Completely different words."
    df.to_parquet(manifest)
    third = Trainer(manifest, "cxr-tiny", tmp_path / "a", config)
    third.run(fresh=True)
    assert third.cache_hits == {"image/train": True, "text/train": False}

    # a subset of the split (max_train_studies) is cut after the cache, so it reuses the split's features
    config.max_train_studies = 10
    fourth = Trainer(manifest, "cxr-tiny", tmp_path / "a", config)
    fourth.run(fresh=True)
    assert fourth.cache_hits == {"image/train": True, "text/train": True}
    sub = fourth.train_split
    assert len(sub.study_images) == 10 and sub.items.study_ids == third.train_split.items.study_ids[:10]
    assert torch.equal(sub.image_feats, third.train_split.image_feats[:10])
    assert torch.equal(sub.text_feats, third.train_split.text_feats[:10])


def test_cnn_feature_pass_keeps_the_vlm_tokens_and_the_same_pooled_features(tmp_path, monkeypatch):
    """With `token_cache`, the frozen cxr-small tower runs once per image: the trainer's pooled features are the
    mean of the feature map whose grid tokens it keeps, and the VLM's token pass then finds every train/val image
    in the cache (no tower run), with the tokens a direct pass gives."""
    from generation.data import features as gen_features
    from generation.model.encoders import encode_visual
    from retrieval.data.manifest import read_manifest
    from retrieval.models import load_model
    from retrieval.training import TrainConfig, Trainer

    manifest = make_manifest(tmp_path / "data", 30)
    tokens_dir = tmp_path / "tokens"
    config = TrainConfig(epochs=1, batch_size=8, show_progress=False, token_cache=str(tokens_dir))
    trainer = Trainer(manifest, "cxr-small", tmp_path / "m", config)
    trainer.run()
    model = load_model(tmp_path / "m")
    items = trainer.train_split.items
    pixels = torch.stack(
        [model.image_transform()(np.asarray(Image.open(p), np.float32) / 255) for p in items.image_paths[:4]]
    )
    with torch.no_grad():
        direct = model.image_features(pixels)
    assert torch.allclose(trainer.train_split.image_feats[:4], direct, atol=1e-4)

    df = read_manifest(manifest)
    rows = [i for i, s in enumerate(df["split"]) if s in ("train", "val")]
    monkeypatch.setattr(gen_features, "encode_visual", lambda *a, **k: pytest.fail("the tower ran again"))
    cached, bad = gen_features.visual_tokens_for_rows(df, rows, [model], 8, progress=False, cache_dir=tokens_dir)
    assert bad == [] and sorted(cached) == rows
    want, kept, _ = encode_visual([model], [str(gen_features.row_image_path(df, r)) for r in rows[:3]], grid=8)
    got = torch.stack([cached[r].float() for r in rows[:3]])
    assert want.shape == got.shape and torch.allclose(got, want, atol=2e-2, rtol=1e-2)


@pytest.mark.slow
def test_saved_text_feature_store_skips_the_tower_and_matches_it(tmp_path, monkeypatch):
    from retrieval.models import load_model
    from retrieval.models.text_features import STORE_FILE
    from retrieval.training import TrainConfig, Trainer

    manifest = make_manifest(tmp_path / "data", 40)
    config = TrainConfig(epochs=1, batch_size=16, show_progress=False)
    Trainer(manifest, "cxr-tiny", tmp_path / "m", config).run()
    assert (tmp_path / "m" / STORE_FILE).is_file()
    reports = pd.read_parquet(manifest)["report"].tolist()
    seen = [r for r, s in zip(reports, pd.read_parquet(manifest)["split"], strict=True) if s != "test"]
    unseen = ["A report the training run never saw.", "Nor this one."]

    model = load_model(tmp_path / "m")
    plain = load_model(tmp_path / "m")
    plain.source_dir = None  # no store: the naive way, every text through the tower
    want = plain.encode_texts(seen + unseen, batch_size=7)

    ran: list[str] = []
    tokenize = model.tokenize
    monkeypatch.setattr(model, "tokenize", lambda texts: (ran.extend(texts), tokenize(texts))[1])
    got = model.encode_texts(seen + unseen, batch_size=7)
    np.testing.assert_allclose(got, want, atol=1e-5)
    assert sorted(ran) == sorted(unseen)  # the stored reports skipped the tower

    # a store made by other text-tower weights is ignored, never trusted
    with torch.no_grad():
        next(model.clip.text.parameters()).add_(0.01)
    ran.clear()
    model.encode_texts(seen[:3])
    assert sorted(ran) == sorted(set(seen[:3]))


def test_unfreeze_last_blocks():
    from retrieval.models import load_model
    from retrieval.training import set_trainable, tower_modules

    model = load_model("cxr-tiny")
    status = set_trainable(model, [], 1)
    assert status == {"image": "last 1 blocks", "text": "last 1 blocks"}
    text = dict(tower_modules(model)["text"].named_parameters())
    last = max(int(n.split("layer.")[1].split(".")[0]) for n in text if "layer." in n)
    assert all(p.requires_grad for n, p in text.items() if f"layer.{last}." in n)
    assert not any(p.requires_grad for n, p in text.items() if "layer.0." in n or "embeddings" in n)

    status = set_trainable(model, ["image"], 0)  # cxr-tiny: image tower from scratch, text frozen
    assert status == {"image": "trained (from scratch)", "text": "frozen"}
    towers = tower_modules(model)
    assert all(p.requires_grad for p in towers["image"].parameters())
    assert not any(p.requires_grad for p in towers["text"].parameters())
    assert all(p.requires_grad for p in model.projector.parameters())  # projectors and head always train


def test_train_cli_json_and_errors(tmp_path, capsys):
    from cli.main import main

    manifest = make_manifest(tmp_path / "data", 40)
    out = tmp_path / "run"
    code = main(
        [
            "train",
            "--manifest",
            str(manifest),
            "--out",
            str(out),
            "--epochs",
            "1",
            "--batch-size",
            "16",
            "--loss-weights",
            "1,1,0",
            "--positive-rule",
            "same-set",
            "--json",
        ]
    )
    assert code == 0
    info = json.loads(capsys.readouterr().out)
    assert info["config"]["loss_weights"] == {"clip": 1.0, "supcon": 1.0, "bce": 0.0}
    assert info["config"]["positive_rule"] == "same-set"
    assert "bce" not in info["history"][0] and "supcon" in info["history"][0]
    assert (out / "train_info.json").is_file()

    assert main(["train", "--manifest", str(manifest), "--out", str(out), "--loss-weights", "1,1"]) == 2
    assert "3 numbers 'clip,supcon,bce'" in capsys.readouterr().err
    assert main(["train", "--manifest", str(tmp_path / "nope.parquet"), "--out", str(out)]) == 1
    assert "manifest not found" in capsys.readouterr().err


def test_task_owns_the_temperature_and_round_trips_its_trainable_state(test_device):
    """RetrievalTask: the loss of a batch, one step that moves the heads and `logit_scale` (clamped), and a
    trainable state that restores exactly what the step changed (and nothing frozen)."""
    from retrieval.labels import label_matrix
    from retrieval.losses import MAX_LOGIT_SCALE
    from retrieval.models import load_model
    from retrieval.training.initial_model import set_trainable
    from retrieval.training.task import RetrievalTask

    model = load_model("cxr-tiny", device=test_device)
    set_trainable(model, [], 0)  # towers frozen: the heads train
    task = RetrievalTask(model, {"clip": 1.0, "bce": 0.5}, "binary", 0.1)
    assert task.logit_scale.device.type == torch.device(test_device).type
    assert task.loss.needs_abnormal_logits  # the BCE term reads the abnormality head
    before = task.trainable_state()
    assert "logit_scale" in before and all(k.startswith("model.") for k in before if k != "logit_scale")
    assert not any("clip.text" in k for k in before)  # a frozen tower is not part of the state

    g = torch.Generator().manual_seed(0)
    img_f = torch.randn(4, model.projector.cfg.image_dim, generator=g).to(test_device)
    txt_f = torch.randn(4, model.projector.cfg.text_dim, generator=g).to(test_device)
    labels = torch.from_numpy(label_matrix([["No Finding"], ["Edema"], ["No Finding"], ["Cardiomegaly"]])[0])
    labels = labels.to(test_device)
    out = task.loss(task.outputs(img_f, txt_f, labels))
    assert list(out) == ["loss", "clip", "bce"]
    assert torch.allclose(out["loss"], out["clip"] + 0.5 * out["bce"])
    optimizer = task.optimizer([], lr=0.5, tower_lr=None, weight_decay=0.0)
    assert any(p is task.logit_scale for p in optimizer.param_groups[0]["params"])
    out["loss"].backward()
    optimizer.step()
    with torch.no_grad():
        task.logit_scale.fill_(10.0)  # beyond the cap
    task.clamp_logit_scale_()
    assert abs(task.logit_scale.exp().item() - MAX_LOGIT_SCALE) < 1e-3

    after = task.trainable_state()
    assert not all(torch.equal(before[k], after[k]) for k in before)
    task.load_trainable_state(before)
    restored = task.trainable_state()
    assert all(torch.equal(before[k], restored[k]) for k in before)


def test_auto_monitor_watches_exact_map_where_label_map_cannot_move():
    """covid-cxr's case: nearly every validation image carries the same label, so label mAP starts at its ceiling
    (0.97 from epoch 1) and early stopping on it ends the run before it learns; auto watches exact-study mAP."""
    from types import SimpleNamespace

    from retrieval.training.loop import choose_monitor

    def split(labels: list[int]) -> SimpleNamespace:
        m = np.eye(3, dtype=bool)[labels]
        return SimpleNamespace(items=SimpleNamespace(image_labels=m, study_labels=m))

    uniform = split([0] * 18 + [1, 2])  # 82% of image-report pairs share a label
    varied = split([0, 1, 2] * 6)  # 33%
    assert choose_monitor("auto", uniform)[0] == "i2r_map_exact"
    assert choose_monitor("auto", varied)[0] == "i2r_map_label"
    assert choose_monitor("auto", None)[0] == "i2r_map_label"
    assert choose_monitor("i2r_map_label", uniform) == ("i2r_map_label", "chosen")


def test_unfreeze_towers_limits_unfreezing_to_the_image_tower():
    from retrieval.models import load_model
    from retrieval.training import set_trainable, tower_modules
    from retrieval.training.config import TrainConfig

    model = load_model("cxr-tiny")
    status = set_trainable(model, [], 1, unfreeze=("image",))
    assert status["text"] == "frozen" and status["image"].startswith("last 1")
    assert not any(p.requires_grad for p in tower_modules(model)["text"].parameters())
    with pytest.raises(Exception, match="image and/or text"):
        TrainConfig(unfreeze_towers=("vision",)).validate()
