"""Retrieval metrics against naive per-query loops and sklearn; split handling; the 2-D plot."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import average_precision_score

from retrieval.data.split_items import SplitItems, split_items
from retrieval.evaluate_retrieval import evaluate_embeddings, random_embeddings
from retrieval.labels import multi_hot
from retrieval.retrieval_metrics import (
    average_precisions,
    mean_average_precision,
    mean_reciprocal_rank,
    overlap_matrix,
    precision_at_k,
    ranked_relevance,
    recall_at_k,
    same_set_matrix,
)


def naive_rank(scores, exclude=None):
    """Per query: gallery indices best first (ties by index), excluded ones removed."""
    out = []
    for q in range(scores.shape[0]):
        keep = [j for j in range(scores.shape[1]) if exclude is None or not exclude[q, j]]
        out.append(sorted(keep, key=lambda j: (-scores[q, j], j)))
    return out


def naive_metrics(scores, relevant, k, exclude=None):
    ranks = naive_rank(scores, exclude)
    recalls, precs, aps, rrs = [], [], [], []
    for q, order in enumerate(ranks):
        rel = [bool(relevant[q, j]) for j in order]
        precs.append(sum(rel[:k]) / k)
        if not any(rel):
            continue
        recalls.append(float(any(rel[:k])))
        rrs.append(1.0 / (rel.index(True) + 1))
        hits, total = 0, 0.0
        for i, r in enumerate(rel, start=1):
            if r:
                hits += 1
                total += hits / i
        aps.append(total / sum(rel))
    return np.mean(recalls), np.mean(precs), np.mean(aps), np.mean(rrs)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("k", [1, 3, 5])
def test_metrics_match_naive_loops(seed, k):
    rng = np.random.default_rng(seed)
    scores = rng.standard_normal((7, 11))
    relevant = rng.random((7, 11)) < 0.3
    relevant[0] = False  # a query with nothing relevant
    exclude = rng.random((7, 11)) < 0.2
    for ex in (None, exclude):
        ranked = ranked_relevance(scores, relevant, ex)
        r, p, ap, rr = naive_metrics(scores, relevant, k, ex)
        assert recall_at_k(ranked, k) == pytest.approx(r)
        assert precision_at_k(ranked, k) == pytest.approx(p)
        assert mean_average_precision(ranked) == pytest.approx(ap)
        assert mean_reciprocal_rank(ranked) == pytest.approx(rr)


def test_average_precision_matches_sklearn():
    rng = np.random.default_rng(3)
    scores = rng.standard_normal((9, 20))
    relevant = rng.random((9, 20)) < 0.25
    relevant[:, 0] = True
    exclude = rng.random((9, 20)) < 0.15
    exclude[:, 0] = False
    ours = average_precisions(ranked_relevance(scores, relevant, exclude))
    for q in range(9):
        keep = ~exclude[q]
        ref = average_precision_score(relevant[q, keep], scores[q, keep])
        assert ours[q] == pytest.approx(ref)
    assert np.isnan(average_precisions(np.zeros((1, 4), dtype=bool)))[0]


def test_ties_are_broken_by_gallery_order():
    ranked = ranked_relevance(np.zeros((1, 4)), np.array([[False, False, True, False]]))
    assert ranked.tolist() == [[False, False, True, False]]
    assert mean_reciprocal_rank(ranked) == pytest.approx(1 / 3)


def test_label_relevance_matrices():
    q = multi_hot([["No Finding"], ["Edema", "Cardiomegaly"]])
    g = multi_hot([["No Finding"], ["Edema"], ["Cardiomegaly", "Edema"], ["Pneumothorax"]])
    assert overlap_matrix(q, g).tolist() == [[True, False, False, False], [False, True, True, False]]
    assert same_set_matrix(q, g).tolist() == [[True, False, False, False], [False, False, True, False]]


def _items() -> SplitItems:
    # 6 studies, 10 images, 4 patients; study labels = image labels
    study_sets = [["No Finding"], ["Edema"], ["Edema", "Cardiomegaly"], ["No Finding"], ["Pneumothorax"], ["Edema"]]
    image_study = np.array([0, 0, 1, 2, 2, 3, 4, 4, 5, 5])
    patient_of_study = np.array([0, 0, 1, 2, 3, 3])
    m = multi_hot(study_sets)
    return SplitItems(
        image_ids=[f"i{i}" for i in range(10)],
        image_paths=[f"i{i}.png" for i in range(10)],
        image_study=image_study,
        image_patient=patient_of_study[image_study],
        image_labels=m[image_study],
        study_ids=[f"s{i}" for i in range(6)],
        reports=[f"report {i}" for i in range(6)],
        study_labels=m,
    )


def test_evaluate_embeddings_against_naive_directions():
    items = _items()
    img, rep = random_embeddings(10, 6, 8, seed=5)
    res = evaluate_embeddings(items, img, rep, ks=(1, 5))
    m = res["metrics"]
    sets = [set(np.flatnonzero(r)) for r in items.image_labels]
    ssets = [set(np.flatnonzero(r)) for r in items.study_labels]

    # image->report: exact = own study
    scores = img @ rep.T
    exact = items.image_study[:, None] == np.arange(6)[None, :]
    r1, _, ap, rr = naive_metrics(scores, exact, 1)
    assert m["image->report"]["R@1"] == pytest.approx(r1)
    assert m["image->report"]["MRR"] == pytest.approx(rr)
    assert m["image->report"]["mAP_exact"] == pytest.approx(ap)
    overlap = np.array([[bool(a & b) for b in ssets] for a in sets])
    _, p5, apl, _ = naive_metrics(scores, overlap, 5)
    assert m["image->report"]["LP@5"] == pytest.approx(p5)
    assert m["image->report"]["mAP_label"] == pytest.approx(apl)

    # report->image: a report's relevant images are all images of its study
    _, _, ap_r2i, _ = naive_metrics(rep @ img.T, exact.T, 1)
    assert m["report->image"]["mAP_exact"] == pytest.approx(ap_r2i)

    # image->image: own patient excluded, no exact metrics, strict label precision
    same_patient = items.image_patient[:, None] == items.image_patient[None, :]
    identical = np.array([[a == b for b in sets] for a in sets])
    _, p5x, _, _ = naive_metrics(img @ img.T, identical, 5, exclude=same_patient)
    assert m["image->image"]["LPx@5"] == pytest.approx(p5x)
    assert m["image->image"]["R@1"] is None and m["image->image"]["MRR"] is None

    # per-label: Edema queries in image->report
    edema = items.label_names.index("Edema")
    rows = np.flatnonzero(items.image_labels[:, edema])
    has_edema = np.broadcast_to(items.study_labels[:, edema], (rows.size, 6))
    _, p5_edema, ap_edema, _ = naive_metrics(scores[rows], has_edema, 5)
    row = res["per_label"]["image->report"]["Edema"]
    assert row["queries"] == rows.size and row["gallery"] == 3
    assert row["P@5"] == pytest.approx(p5_edema) and row["AP"] == pytest.approx(ap_edema)


def test_perfect_embeddings_score_one():
    items = _items()
    # each study a one-hot direction; its images and report on it
    rep = np.eye(6, 8, dtype=np.float32)
    img = rep[items.image_study]
    m = evaluate_embeddings(items, img, rep)["metrics"]["image->report"]
    assert m["R@1"] == 1.0 and m["MRR"] == 1.0 and m["mAP_exact"] == 1.0


def test_split_items_skips_bad_rows_and_labels_empty_sets(tmp_path):
    for name in ("a.png", "b.png", "c.png"):
        (tmp_path / name).write_bytes(b"x")
    df = pd.DataFrame(
        {
            "image_id": ["1", "2", "3", "4", "5"],
            "study_id": ["s1", "s1", "s2", "s3", "s4"],
            "patient_id": ["p1", "p1", "p2", "p3", "p4"],
            "image_path": ["a.png", "b.png", "c.png", "missing.png", "a.png"],
            "report": ["Cardiomegaly.", "Cardiomegaly.", "There is a large pleural effusion.", "x", ""],
            "labels": [["Cardiomegaly"], ["Cardiomegaly"], [], ["Edema"], []],
            "split": ["test"] * 5,
        }
    )
    df.attrs["root"] = str(tmp_path)
    items = split_items(df, "test")
    assert items.image_ids == ["1", "2", "3"]
    assert items.study_ids == ["s1", "s2"]
    assert len(items.skipped) == 2 and any("missing.png" in s for s in items.skipped)
    effusion = items.label_names.index("Pleural Effusion")
    assert items.image_labels[2, effusion]  # filled by the report labeler
    assert items.labelled_by_labeler == 1  # and counted, so the CLI says so
    with pytest.raises(Exception, match="no rows in split"):
        split_items(df, "val")


def test_plot_writes_png(tmp_path):
    from retrieval.embedding_plot import plot_embeddings, project_2d

    rng = np.random.default_rng(0)
    x = rng.standard_normal((40, 6))
    abnormal = np.arange(40) % 2 == 0
    out = plot_embeddings({"a": x, "b": x + abnormal[:, None]}, abnormal, tmp_path / "p.png", method="pca")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    xy, used = project_2d(x, "pca")
    assert used == "PCA" and xy.shape == (40, 2)
    # PCA's first axis carries the most variance
    assert xy[:, 0].var() >= xy[:, 1].var()


def _synthetic_manifest(root, n: int = 24):
    """Tiny manifest: grey images with a bright patch for abnormal studies, matching one-line reports."""
    from PIL import Image

    from retrieval.data.manifest import write_manifest

    rng = np.random.default_rng(0)
    rows = []
    for i in range(n):
        abnormal = i % 2 == 1
        img = rng.normal(0.4, 0.05, (48, 48))
        if abnormal:
            img[10:30, 10:30] += 0.4
        Image.fromarray((np.clip(img, 0, 1) * 255).astype(np.uint8)).save(root / f"{i}.png")
        rows.append(
            {
                "image_id": f"i{i}",
                "study_id": f"s{i}",
                "patient_id": f"p{i // 4}",
                "image_path": f"{i}.png",
                "report": "The heart is enlarged." if abnormal else "The lungs are clear.",
                "labels": ["Cardiomegaly"] if abnormal else ["No Finding"],
                "split": "test" if i < 16 else "train",
            }
        )
    path = root / "manifest.parquet"
    write_manifest(pd.DataFrame(rows), path)
    return path


@pytest.mark.slow
def test_eval_cli_on_tiny_manifest(tmp_path, capsys):
    import json

    import torch

    from cli.main import main
    from retrieval.models import load_model

    manifest = _synthetic_manifest(tmp_path)
    torch.manual_seed(0)
    load_model("cxr-tiny").save(tmp_path / "model")  # an untrained seed-0 model: equals its zero-shot baseline
    plot = tmp_path / "emb.png"
    args = ["eval", "retrieval", "--model", str(tmp_path / "model"), "--manifest", str(manifest), "--split", "test"]
    code = main([*args, "--json", "--plot", str(plot)])
    assert code == 0
    result = json.loads(capsys.readouterr().out)
    assert result["images"] == 16 and result["studies"] == 16 and result["patients"] == 4
    systems = result["systems"]
    assert set(systems) == {"model", "zero-shot", "random"}
    for direction in ("image->report", "report->image", "image->image"):
        assert systems["model"]["metrics"][direction] == systems["zero-shot"]["metrics"][direction]
    assert systems["model"]["metrics"]["image->report"] != systems["random"]["metrics"]["image->report"]
    assert "Cardiomegaly" in systems["model"]["per_label"]["image->report"]
    assert plot.read_bytes()[:4] == b"\x89PNG"

    # the human-readable table, and a clear error for a missing split
    assert main([*args, "--no-baselines"]) == 0
    out = capsys.readouterr().out
    assert "image->report" in out and "R@1" in out and "random" not in out
    assert (
        main(["eval", "retrieval", "--model", str(tmp_path / "model"), "--manifest", str(manifest), "--split", "val"])
        == 1
    )
    assert "no rows in split 'val'" in capsys.readouterr().err
