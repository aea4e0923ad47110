"""`cxr index build|add|info` and `cxr query` end to end: output, exit codes, DICOM and batch queries."""

from __future__ import annotations

import json
from pathlib import Path

import faiss
import numpy as np
import pandas as pd
import pydicom
import pytest
from dicom_maker import write_dicom
from index_helpers import FakeModel, make_corpus

from cli.main import main
from index.search import Searcher
from retrieval.data.manifest import read_manifest, write_manifest

faiss.omp_set_num_threads(1)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    return make_corpus(tmp_path_factory.mktemp("corpus"), n=24)


@pytest.fixture
def index(corpus, tmp_path, fake_models, capsys) -> Path:
    out = tmp_path / "idx"
    args = ["index", "build", "-m", str(corpus), "--model", "fake-0", "--out", str(out), "--workers", "0", "--json"]
    assert main(args) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["count"] == 24 and result["bad_images"] == 2
    return out


def test_info(index, capsys):
    assert main(["index", "info", str(index), "--json"]) == 0
    s = json.loads(capsys.readouterr().out)
    assert (s["rows"], s["studies"], s["bad_images"], s["factory"]) == (24, 12, 2, "Flat")
    assert main(["index", "info", str(index)]) == 0
    assert "fake-0" in capsys.readouterr().out


def test_text_query_json_matches_the_library(index, capsys):
    assert (
        main(["query", "--text", "pleural effusions", "--index", str(index), "--model", "fake-0", "-k", "3", "--json"])
        == 0
    )
    doc = json.loads(capsys.readouterr().out)
    want = Searcher(index, FakeModel()).query_text("pleural effusions", k=3)
    assert [r["study_id"] for r in doc["results"]] == list(want["study_id"])
    assert [r["rank"] for r in doc["results"]] == [1, 2, 3]
    assert doc["results"][0]["report"] == "Cardiomegaly with small bilateral pleural effusions."
    assert main(["query", "--text", "pleural effusions", "--index", str(index), "--model", "fake-0"]) == 0
    table = capsys.readouterr().out
    assert "rank" in table and "pleural effusions" in table


def test_dicom_query_finds_the_same_picture(index, corpus, tmp_path, capsys):
    from PIL import Image

    png = Path(read_manifest(corpus).attrs["root"]) / "images" / "im0009.png"
    dcm = write_dicom(tmp_path / "query.dcm", np.asarray(Image.open(png)))
    args = ["query", str(dcm), "--index", str(index), "--model", "fake-0", "--target", "images", "-k", "2", "--json"]
    assert main(args) == 0
    top, second = json.loads(capsys.readouterr().out)["results"]
    # DICOM rescaling differs from PNG's /255 by rounding only: same picture, near-identical vector
    assert top["image_id"] == "img0009" and top["score"] == pytest.approx(1.0, abs=1e-3)
    assert second["score"] < 0.9
    assert pydicom.dcmread(dcm).Modality == "DX"


def test_exclude_patient(index, capsys):
    base = ["query", "--text", "pneumonia", "--index", str(index), "--model", "fake-0", "-k", "3", "--json"]
    assert main(base) == 0
    first = json.loads(capsys.readouterr().out)["results"]
    patient = first[0]["patient_id"]
    assert main([*base, "--exclude-patient", patient]) == 0
    after = json.loads(capsys.readouterr().out)["results"]
    assert patient not in {r["patient_id"] for r in after} and len(after) == 3


def test_batch_query_of_a_manifest_writes_parquet_and_lists_bad_images(index, corpus, tmp_path, capsys):
    out = tmp_path / "res.parquet"
    args = ["query", str(corpus), "--index", str(index), "--model", "fake-0", "-k", "2"]
    args += ["--target", "images", "--out", str(out), "--workers", "0", "--json"]
    assert main(args) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary == {
        "queries": 26,
        "answered": 24,
        "no_close_match": 0,  # 24 rows: too few held-out queries for a threshold, so every query is close
        "bad_images": 2,
        "results": str(out),
        "bad_list": str(tmp_path / "res.bad_images.csv"),
    }
    res = pd.read_parquet(out)
    assert len(res) == 48 and set(res["rank"]) == {1, 2} and res["close_match"].all()
    top = res[res["rank"] == 1]
    assert (top["query"] == top["image_path"]).all()  # every indexed image finds itself first
    bad = pd.read_csv(tmp_path / "res.bad_images.csv")
    assert sorted(Path(p).name for p in bad["path"]) == ["corrupt.png", "empty.png"]


def test_exit_codes(index, corpus, tmp_path, capsys):
    idx = str(index)
    assert main(["query", "--index", idx, "--model", "fake-0"]) == 2  # neither image nor text
    assert main(["query", str(corpus), "--text", "x", "--index", idx, "--model", "fake-0"]) == 2  # both
    assert main(["query", "--text", "x", "--index", idx, "--model", "fake-0", "--target", "words"]) == 2
    assert main(["query", "--text", "x", "--index", idx, "--model", "fake-0", "-k", "0"]) == 2
    assert main(["query", "--text", "x", "--index", idx, "--model", "fake-0", "--nprobe", "4"]) == 2  # Flat
    assert main(["query", "--text", "x", "--index", idx, "--model", "fake-0", "--mmap"]) == 2  # Flat
    assert main(["query", str(corpus), "--index", idx, "--model", "fake-0"]) == 2  # batch without --out
    assert main(["query", "--text", "x", "--index", idx]) == 2  # model folder not recorded: pass --model
    capsys.readouterr()
    assert main(["query", "--text", "x", "--index", str(tmp_path / "none"), "--model", "fake-0"]) == 1
    assert main(["query", "--text", "x", "--index", idx, "--model", "fake-1"]) == 1  # other fingerprint
    err = capsys.readouterr().err
    assert "fingerprint" in err and err.count("\n") == 2  # one line per error
    empty = Path(read_manifest(corpus).attrs["root"]) / "images" / "empty.png"
    assert main(["query", str(empty), "--index", idx, "--model", "fake-0"]) == 1
    assert "empty.png" in capsys.readouterr().err
    assert main(["index", "build", "-m", str(corpus), "--model", "fake-0", "--out", idx]) == 0  # done already
    assert "nothing to do" in capsys.readouterr().out
    assert main(["index", "build", "-m", str(corpus), "--model", "fake-0", "--out", idx, "--factory", "HNSW8"]) == 1
    assert (
        main(
            [
                "index",
                "build",
                "-m",
                str(corpus),
                "--model",
                "fake-0",
                "--out",
                str(tmp_path / "x"),
                "--factory",
                "Bogus",
            ]
        )
        == 2
    )
    assert main(["index", "info", str(tmp_path / "none")]) == 1


def test_add_via_cli(corpus, tmp_path, fake_models, capsys):
    df = read_manifest(corpus)
    root = Path(df.attrs["root"])
    df["image_path"] = [str(root / p) for p in df["image_path"]]
    write_manifest(df.iloc[:10], tmp_path / "a.parquet")
    write_manifest(df.iloc[10:], tmp_path / "b.parquet")
    out = str(tmp_path / "idx")
    assert (
        main(["index", "build", "-m", str(tmp_path / "a.parquet"), "--model", "fake-0", "--out", out, "--workers", "0"])
        == 1
    )  # absolute paths outside the manifest's folder need --allow-outside
    assert "--allow-outside" in capsys.readouterr().err
    assert (
        main(["index", "build", "-m", str(tmp_path / "a.parquet"), "--model", "fake-0", "--out", out, "--workers", "0",
              "--allow-outside"])  # fmt: skip
        == 0
    )
    args = ["index", "add", "--index", out, "-m", str(tmp_path / "b.parquet"), "--model", "fake-0", "--workers", "0"]
    args.append("--allow-outside")
    capsys.readouterr()
    assert main([*args, "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert (result["count"], result["added"], result["bad_images"]) == (24, 16, 0)  # both bad rows were in a
    assert main(args) == 0  # the same add again: already committed, nothing to do
    assert "nothing to do" in capsys.readouterr().out
    write_manifest(df.iloc[12:14], tmp_path / "c.parquet")
    assert main([*args[:5], str(tmp_path / "c.parquet"), *args[6:]]) == 1  # image_ids already in the index
    assert "already in the index" in capsys.readouterr().err


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory) -> Path:
    from retrieval.models import load_model

    folder = tmp_path_factory.mktemp("tiny") / "cxr-tiny"
    load_model("cxr-tiny", device="cpu").save(folder)
    return folder


@pytest.mark.slow
def test_real_cxr_tiny_build_then_query_with_the_recorded_model(tiny_folder, corpus, tmp_path, monkeypatch, capsys):
    """The real encoder (cxr-tiny, saved folder), real worker processes; the query finds the model by itself."""
    import retrieval.models as models

    real, cache = models.load_model, {}
    monkeypatch.setattr(models, "load_model", lambda p, device=None: cache.setdefault(str(p), real(p, device="cpu")))
    out = tmp_path / "idx"
    build = ["index", "build", "-m", str(corpus), "--model", str(tiny_folder), "--out", str(out), "--batch-size", "8"]
    assert main([*build, "--workers", "2", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["count"] == 24
    png = Path(read_manifest(corpus).attrs["root"]) / "images" / "im0005.png"
    assert main(["query", str(png), "--index", str(out), "--target", "images", "-k", "1", "--json"]) == 0
    top = json.loads(capsys.readouterr().out)["results"][0]
    assert top["image_id"] == "img0005" and top["score"] == pytest.approx(1.0, abs=1e-4)
    assert main(["query", "--text", "pneumothorax", "--index", str(out), "-k", "2", "--json"]) == 0
    assert len(json.loads(capsys.readouterr().out)["results"]) == 2
    assert list(cache) == [str(tiny_folder)]  # loaded from the folder recorded in index_info.json


def test_build_tunes_and_info_prints_the_search_parameters(corpus, tmp_path, fake_models, capsys):
    out = tmp_path / "idx"
    args = ["index", "build", "-m", str(corpus), "--model", "fake-0", "--out", str(out), "--workers", "0"]
    assert main([*args, "--factory", "HNSW4,Flat", "--target-recall", "0.9", "--json"]) == 0
    built = json.loads(capsys.readouterr().out)
    rec = built["search"]["images"]
    assert rec["target"] == 0.9 and rec["queries"] == 24 and set(rec["params"]) == {"efSearch"}
    assert main(["index", "info", str(out), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["search"] == built["search"]
    assert main(["index", "info", str(out)]) == 0
    text = " ".join(capsys.readouterr().out.split())
    assert f"efSearch {rec['params']['efSearch']}: recall@10 {rec['recall']:.3f} on 24 sample queries" in text
    # the Searcher behind `cxr query` uses them; --ef-search overrides
    assert Searcher(out, FakeModel()).search_params["images"] == rec["params"]
    assert Searcher(out, FakeModel(), ef_search=99).search_params["images"] == {"efSearch": 99}


def test_a_bad_memory_budget_is_one_line_and_exit_2(corpus, tmp_path, fake_models, capsys):
    args = ["index", "build", "-m", str(corpus), "--model", "fake-0", "--out", str(tmp_path / "i"), "--workers", "0"]
    assert main([*args, "--max-memory", "lots"]) == 2
    err = capsys.readouterr().err
    assert "--max-memory" in err and len(err.strip().splitlines()) == 1
    assert main([*args, "--max-memory", "1k"]) == 2  # 24 vectors of dim 32 need more than 1 KiB
    assert "too small" in capsys.readouterr().err
