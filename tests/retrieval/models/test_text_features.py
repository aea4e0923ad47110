"""pooled_features: each distinct text once, sorted batches, known features used, same result as one at a time."""

from __future__ import annotations

import torch

from retrieval.models.text_features import load_store, pooled_features, save_store, text_digests


def _featurize(calls: list[list[str]]):
    def run(chunk: list[str]) -> torch.Tensor:
        calls.append(list(chunk))
        return torch.tensor([[len(t), sum(map(ord, t)) % 97, 1.0] for t in chunk], dtype=torch.float32)

    return run


TEXTS = ["bb", "a", "ccc", "a", "dddd", "bb", "eeeee", "a"]


def test_pooled_features_equal_one_at_a_time_and_dedupe():
    calls: list[list[str]] = []
    got = pooled_features(_featurize(calls), TEXTS, batch_size=2)
    naive = torch.cat([_featurize([])([t]) for t in TEXTS])
    assert torch.equal(got, naive)
    flat = [t for c in calls for t in c]
    assert sorted(flat) == sorted(set(TEXTS))  # each distinct text once
    assert [len(t) for t in flat] == sorted(len(t) for t in flat)  # batches in length order
    assert all(len(c) <= 2 for c in calls)


def test_known_features_skip_the_tower(tmp_path):
    feats = pooled_features(_featurize([]), TEXTS)
    save_store(tmp_path, TEXTS, feats, tower="abc")
    known = load_store(tmp_path, "abc")
    assert len(known) == len(set(TEXTS))
    assert load_store(tmp_path, "other") == {}  # other tower weights: ignored
    calls: list[list[str]] = []
    got = pooled_features(_featurize(calls), ["a", "new", "ccc"], known=known)
    assert [t for c in calls for t in c] == ["new"]
    assert torch.equal(got, pooled_features(_featurize([]), ["a", "new", "ccc"]))


def test_damaged_store_is_ignored(tmp_path):
    (tmp_path / "text_features.safetensors").write_bytes(b"not a safetensors file")
    assert load_store(tmp_path, "abc") == {}
    assert text_digests(["x"]).shape == (1, 32)
