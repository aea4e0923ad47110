"""The VLM's typed config (`VLMConfig`: saved and reloaded, old dict-shaped folders still load) and its collator."""

from __future__ import annotations

import json

import pytest
import torch
from gen_synth import UNIT_LM, one_thread  # noqa: F401 (an autouse fixture)

from generation.model.collate import IGNORE, collate, splice_image
from generation.model.vlm import VLM
from generation.model.vlm_config import DEFAULT_BUDGET, VLMConfig
from retrieval.errors import ModelLoadError

# vlm_config.json as the first VLM versions wrote it: a plain dict without the later keys
OLD_CONFIG = {
    "visual_dim": 12,
    "group": 5,
    "encoders": [{"spec": "patch:1", "name": "patch:1"}],
    "lm_path": None,
    "lora": False,
    "lora_r": 8,
    "visual_grid": 4,
    "tasks": ["report", "vqa"],
    "from_a_newer_version": {"x": 1},
}


def test_config_round_trips_and_reads_like_the_old_dict():
    cfg = VLMConfig(visual_dim=7, encoders=[{"spec": "patch:1"}], aux_labels=3, loss_norm="example")
    d = cfg.to_dict()
    assert list(d)[:3] == ["visual_dim", "group", "encoders"] and "extra" not in d
    assert VLMConfig.from_dict(json.loads(json.dumps(d))) == cfg
    # the mapping view the trainer and the evaluation use
    cfg.update(visual_grid=4, rag_k=2, future_key="kept")
    cfg["head_thresholds"] = [0.5, 0.4, 0.3]
    assert (cfg.visual_grid, cfg.rag_k, cfg.head_thresholds) == (4, 2, [0.5, 0.4, 0.3])
    assert cfg["encoders"] == [{"spec": "patch:1"}] and cfg.get("tasks") is None and cfg.get("nope", 9) == 9
    assert "future_key" in cfg and cfg.to_dict()["future_key"] == "kept" and "extra" not in cfg
    with pytest.raises(ValueError):
        VLMConfig(visual_dim=7, loss_norm="tokens")
    with pytest.raises(ValueError):
        VLMConfig.from_dict({"encoders": []})


def test_an_old_dict_config_folder_still_loads(tmp_path):
    torch.manual_seed(0)
    vlm = VLM.create(12, OLD_CONFIG["encoders"], lm_overrides=UNIT_LM, corpus=["the heart is normal.", "no"]).eval()
    vlm.save(tmp_path / "v")
    (tmp_path / "v" / "vlm_config.json").write_text(json.dumps(OLD_CONFIG))
    back = VLM.load(tmp_path / "v")
    c = back.config
    assert isinstance(c, VLMConfig) and (c.visual_dim, c.visual_grid, c.tasks) == (12, 4, ["report", "vqa"])
    # the keys it lacks read as the old code's fallbacks did
    assert (c.loss_norm, c.coord_sigma, c.aux_labels, c.prompt_budget, c.rag_k) == ("token", 0.0, 0, DEFAULT_BUDGET, 1)
    assert back.aux_head is None and c.head_thresholds is None
    visual = torch.randn(2, 16, 12, generator=torch.Generator().manual_seed(1))
    prompts = [[5, 6, 7], [8]]
    assert back.generate(visual, prompts, max_new_tokens=5) == vlm.generate(visual, prompts, max_new_tokens=5)
    back.save(tmp_path / "again")  # an unknown key survives a save
    assert json.loads((tmp_path / "again" / "vlm_config.json").read_text())["from_a_newer_version"] == {"x": 1}
    (tmp_path / "v" / "vlm_config.json").write_text(json.dumps({"group": 5}))
    with pytest.raises(ModelLoadError):
        VLM.load(tmp_path / "v")


def _naive_train_rows(prompts, targets, n_img, pad, eos):
    seqs = [p + t + [eos] for p, t in zip(prompts, targets)]
    length = max(map(len, seqs))
    ids = torch.full((len(seqs), length), pad)
    labels = torch.full((len(seqs), n_img + length), -100)
    mask = torch.zeros((len(seqs), n_img + length), dtype=torch.long)
    for i, (s, p) in enumerate(zip(seqs, prompts)):
        ids[i, : len(s)] = torch.tensor(s)
        labels[i, n_img + len(p) : n_img + len(s)] = torch.tensor(s[len(p) :])
        mask[i, : n_img + len(s)] = 1
    return ids, labels, mask


def test_collate_pads_like_the_naive_loops():
    prompts, targets = [[3, 4, 5], [6], [7, 8]], [[9, 10], [11, 12, 13, 14], []]
    b = collate(prompts, targets, n_image=4, pad_id=0, eos_id=2)
    ids, labels, mask = _naive_train_rows(prompts, targets, 4, 0, 2)
    assert torch.equal(b.ids, ids) and torch.equal(b.labels, labels) and torch.equal(b.attention_mask, mask)
    assert b.image_at == [0, 0, 0] and IGNORE == -100
    g = collate(prompts, None, n_image=4, pad_id=0, eos_id=2)  # generation: left padding, image after the pads
    assert g.labels is None and g.image_at == [0, 2, 1]
    assert g.ids.tolist() == [[3, 4, 5], [0, 0, 6], [0, 7, 8]]
    assert g.attention_mask.tolist() == [[1] * 7, [0, 0] + [1] * 5, [0] + [1] * 6]
    img, text = torch.randn(3, 4, 2), torch.randn(3, 3, 2)
    spliced = splice_image(img, text, g.image_at)
    assert torch.equal(spliced[1], torch.cat([text[1, :2], img[1], text[1, 2:]]))
    assert torch.equal(splice_image(img, text, [0, 0, 0]), torch.cat([img, text], dim=1))
