"""Knowing when there is no close match (index/abstain.py) and one result per patient: the threshold against a
brute-force reference, `cxr query` saying "no close match" for an image unlike the collection, and the
per-patient filter against a naive ranking."""

from __future__ import annotations

import json
from pathlib import Path

import faiss
import numpy as np
import pandas as pd
import pytest
from index_helpers import FakeModel
from PIL import Image

from cli.main import main
from index import abstain
from index.search import Searcher
from retrieval.data.manifest import write_manifest

faiss.omp_set_num_threads(1)


def _naive_threshold(vectors: np.ndarray, patients: np.ndarray, sample: np.ndarray, q: float) -> float:
    """Brute force: each sample row's best score among rows of other patients, then the q-quantile."""
    sims = vectors[sample] @ vectors.T
    sims[patients[sample][:, None] == patients[None, :]] = -np.inf
    return float(np.quantile(sims.max(axis=1), q))


def test_threshold_matches_a_brute_force_reference() -> None:
    rng = np.random.default_rng(0)
    vectors = rng.standard_normal((300, 16)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    patients = np.repeat(np.arange(100), 3).astype(str)
    index = faiss.IndexFlatIP(16)
    index.add(vectors)
    sample = np.sort(rng.choice(300, 120, replace=False))
    both = {"images": index, "reports": index}
    rec = abstain.calibrate(both, {"images": vectors[sample], "reports": vectors[sample]}, sample, patients)
    want = _naive_threshold(vectors, patients, sample, abstain.QUANTILE)
    assert rec["image"]["threshold"] == pytest.approx(want, abs=1e-5)
    assert rec["image"]["queries"] == 120 and rec["text"]["threshold"] == pytest.approx(want, abs=1e-5)
    # the record turns away about the quantile's share of the held-out queries themselves
    sims = vectors[sample] @ vectors.T
    sims[patients[sample][:, None] == patients[None, :]] = -np.inf
    passed = np.mean([abstain.judge(rec["image"], s)["close"] for s in sims.max(axis=1)])
    assert 0.93 <= passed <= 0.97
    few = abstain.calibrate(both, {"images": vectors[:10], "reports": vectors[:10]}, np.arange(10), patients)
    assert few == {}  # too few held-out queries: no threshold, never a guessed one


def _chest(rng: np.random.Generator, size: int = 32) -> np.ndarray:
    """A crude frontal 'chest': two dark lungs in a bright body, with noise (one image of the collection)."""
    img = np.full((size, size), 0.7)
    img[6:28, 4:14] = 0.2
    img[6:28, 18:28] = 0.2
    return np.clip(img + rng.normal(0, 0.05, img.shape), 0, 1)


@pytest.fixture(scope="module")
def chest_index(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """An index over 120 'chests' (60 patients, 2 studies each), built with the fake model; and its folder."""
    import retrieval.models

    root = tmp_path_factory.mktemp("chests")
    rng = np.random.default_rng(0)
    (root / "img").mkdir()
    rows = []
    for i in range(120):
        Image.fromarray((_chest(rng) * 255).astype(np.uint8)).save(root / "img" / f"{i}.png")
        rows.append({"image_id": f"i{i}", "study_id": f"s{i}", "patient_id": f"p{i // 2}", "image_path": f"img/{i}.png",
                     "view": "PA", "report": f"Study {i}. No acute abnormality.", "labels": ["No Finding"],
                     "split": "train", "source": "synthetic"})  # fmt: skip
    write_manifest(pd.DataFrame(rows), root / "m.parquet")
    new = root / "new_chest.png"
    Image.fromarray((_chest(np.random.default_rng(99)) * 255).astype(np.uint8)).save(new)
    out = root / "idx"
    real = retrieval.models.load_model
    retrieval.models.load_model = lambda name, device=None: FakeModel(seed=0)
    try:
        args = ["index", "build", "-m", str(root / "m.parquet"), "--model", "fake-0", "--out", str(out)]
        assert main([*args, "--workers", "0", "--json"]) == 0
    finally:
        retrieval.models.load_model = real
    return out, new


@pytest.fixture
def fake_models(monkeypatch):
    monkeypatch.setattr("retrieval.models.load_model", lambda name, device=None: FakeModel(seed=0))


def _query(capsys, *args: str) -> tuple[int, str]:
    capsys.readouterr()
    code = main(["query", *args])
    return code, capsys.readouterr().out


def test_query_says_no_close_match_for_an_image_unlike_the_collection(chest_index, fake_models, tmp_path, capsys):
    index, new_chest = chest_index
    recorded = Searcher(index, FakeModel(seed=0)).index.info["abstain"]
    assert recorded["image"]["queries"] == 120 and recorded["text"]["queries"] == 120
    stripes = np.tile(np.linspace(0, 1, 32), (32, 1)).T  # a figure-like gradient, nothing like a chest
    Image.fromarray((stripes * 255).astype(np.uint8)).save(tmp_path / "figure.png")
    base = ["--index", str(index), "--model", "fake-0", "-k", "3"]

    code, out = _query(capsys, str(tmp_path / "figure.png"), *base, "--json")
    doc = json.loads(out)
    assert code == 0 and doc["no_close_match"] and doc["results"] == []
    assert doc["match"]["closeness"] < doc["match"]["threshold"]
    code, out = _query(capsys, str(tmp_path / "figure.png"), *base)
    assert code == 0 and "no close match" in out and "Study" not in out
    code, out = _query(capsys, str(tmp_path / "figure.png"), *base, "--show-far", "--json")
    assert len(json.loads(out)["results"]) == 3

    code, out = _query(capsys, str(new_chest), *base, "--json")  # a new image like the collection's
    doc = json.loads(out)
    assert code == 0 and not doc["no_close_match"] and len(doc["results"]) == 3
    assert doc["match"]["closeness"] >= doc["match"]["threshold"]


def _naive_per_patient(searcher: Searcher, vector: np.ndarray, k: int) -> list[int]:
    """Every row scored exactly, best first, then each study's and each patient's first row kept."""
    vecs = searcher.index.images.reconstruct_n(0, searcher.index.count)
    order = np.argsort(-(vecs @ vector[0]), kind="stable")
    meta = searcher.index.meta
    seen_p: set[str] = set()
    out = []
    for r in order:
        p = str(meta["patient_id"].iloc[r])
        if p not in seen_p:
            seen_p.add(p)
            out.append(int(r))
    return out[:k]


def test_one_per_patient_is_the_default_and_matches_a_naive_ranking(chest_index, fake_models, capsys) -> None:
    index, new_chest = chest_index
    searcher = Searcher(index, FakeModel(seed=0), one_per_patient=True)
    vector = searcher.image_vector(str(new_chest))
    got = searcher.query_vector(vector, 8, "images")
    assert got["patient_id"].is_unique and list(got["row_id"]) == _naive_per_patient(searcher, vector, 8)
    base = [str(new_chest), "--index", str(index), "--model", "fake-0", "-k", "30", "--target", "images", "--json"]
    _, out = _query(capsys, *base)
    assert pd.Series([r["patient_id"] for r in json.loads(out)["results"]]).is_unique
    _, out = _query(capsys, *base, "--all-per-patient")
    assert not pd.Series([r["patient_id"] for r in json.loads(out)["results"]]).is_unique  # 2 studies a patient


def test_the_api_says_no_close_match_too(chest_index) -> None:
    pytest.importorskip("fastapi")
    from serve.service import ServeConfig, ServeService

    index, new_chest = chest_index
    svc = ServeService(ServeConfig(index=index, workers=1, watch_interval=0), model=FakeModel(seed=0))
    try:
        stripes = np.tile(np.linspace(0, 1, 32), (32, 1)).T
        far = svc.search(image=stripes, k=3, target="images")
        assert far["no_close_match"] and far["results"] == [] and far["match"]["closeness"] < far["match"]["threshold"]
        chest = np.asarray(Image.open(new_chest), dtype=np.float32) / 255
        near = svc.search(image=chest, k=3, target="images")
        assert not near["no_close_match"] and len(near["results"]) == 3
        assert len({r["patient_id"] for r in near["results"]}) == 3  # one per patient, as cxr query
    finally:
        svc.close()
