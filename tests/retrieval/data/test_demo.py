"""The embedded demo corpus: manifest validity, images on disk, determinism, caching, and the CLI command."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest
from PIL import Image

from retrieval.data.demo import INFO_NAME, MANIFEST_NAME, build_demo_corpus
from retrieval.data.importers.iu_xray import read_iu_reports
from retrieval.data.manifest import read_manifest
from retrieval.data.manifest_check import validate_manifest
from retrieval.labels import LABELS


@pytest.fixture(scope="module", autouse=True)
def _reports_available():
    from retrieval.data.importers.iu_xray import builtin_reports_path

    if not builtin_reports_path().is_file():
        pytest.skip("torchxrayvision's NLMCXR_reports.tgz is not installed")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    df = build_demo_corpus(out, size=128, seed=0, limit=24, workers=1, show_progress=False)
    return out, df


def test_manifest_is_valid_and_files_exist(corpus):
    out, df = corpus
    assert len(df) == 24 and not df.attrs["cached"]
    assert validate_manifest(df, root=out, check_files=True) == []
    reread = read_manifest(out / MANIFEST_NAME)
    assert list(reread["image_id"]) == list(df["image_id"])
    assert set(df["source"]) == {"demo"} and set(df["view"]) == {"PA"}
    assert (df["patient_id"] == df["study_id"]).all() and df["image_id"].is_unique
    for path in df["image_path"]:
        with Image.open(out / path) as im:
            assert im.mode == "L" and im.size == (128, 128)


def test_rows_agree_with_the_reports(corpus):
    _, df = corpus
    reports = {r["study_id"]: r for r in read_iu_reports()}
    for _, row in df.iterrows():
        rec = reports[row["study_id"]]
        assert row["report"] == " ".join(x for x in (rec["findings"], rec["impression"]) if x)
        assert set(row["labels"]) <= set(LABELS) and len(row["labels"]) >= 1
        assert row["label_source"] in {"mesh", "labeler"}
        assert isinstance(list(row["unrendered"]), list)
        finding = [b for b in row["boxes"] if not b["label"].startswith("anatomy:")]
        anatomy = [b for b in row["boxes"] if b["label"].startswith("anatomy:")]
        assert {"anatomy:Right Lung", "anatomy:Left Lung", "anatomy:Heart"} <= {b["label"] for b in anatomy}
        assert row["boxes"][: len(finding)] == finding  # finding boxes first, then anatomy
    # some of the first 24 IU reports name drawable findings
    assert sum(any(not b["label"].startswith("anatomy:") for b in bs) for bs in df["boxes"]) >= 5


def test_splits_are_by_patient_and_seeded(corpus):
    from retrieval.data.manifest import assign_splits

    _, df = corpus
    assert set(df["split"]) <= {"train", "val", "test"}
    assert df.groupby("patient_id")["split"].nunique().max() == 1
    assert list(assign_splits(df, seed=0)["split"]) == list(df["split"])  # the corpus seed drives the splits


def test_second_call_returns_the_cached_corpus(corpus):
    out, df = corpus
    info = json.loads((out / INFO_NAME).read_text())
    assert info["size"] == 128 and info["seed"] == 0 and info["limit"] == 24 and info["studies"] == 24
    t0 = time.perf_counter()
    again = build_demo_corpus(out, size=128, seed=0, limit=24, workers=1, show_progress=False)
    assert again.attrs["cached"] and time.perf_counter() - t0 < 5
    assert list(again["image_id"]) == list(df["image_id"])


def test_deterministic_for_a_seed_across_worker_counts(corpus, tmp_path):
    out, df = corpus
    other = build_demo_corpus(tmp_path / "b", size=128, seed=0, limit=6, workers=2, show_progress=False)
    for (_, a), (_, b) in zip(df.head(6).iterrows(), other.iterrows(), strict=True):
        assert a["image_id"] == b["image_id"] and a["boxes"] == b["boxes"] and a["seed"] == b["seed"]
        ia = np.asarray(Image.open(out / a["image_path"]))
        ib = np.asarray(Image.open(tmp_path / "b" / b["image_path"]))
        np.testing.assert_array_equal(ia, ib)
    seeded = build_demo_corpus(tmp_path / "c", size=128, seed=1, limit=6, workers=1, show_progress=False)
    ia = np.asarray(Image.open(out / df["image_path"].iloc[0]), dtype=float)
    ic = np.asarray(Image.open(tmp_path / "c" / seeded["image_path"].iloc[0]), dtype=float)
    assert np.abs(ia - ic).mean() > 2  # another seed, another patient


def test_an_interrupted_corpus_is_rebuilt(corpus, tmp_path):
    out = tmp_path / "d"
    build_demo_corpus(out, size=96, seed=0, limit=3, workers=1, show_progress=False)
    (out / INFO_NAME).unlink()  # as if killed before the end
    df = build_demo_corpus(out, size=96, seed=0, limit=3, workers=1, show_progress=False)
    assert not df.attrs["cached"] and (out / INFO_NAME).is_file()


def test_bad_arguments_are_usage_errors(tmp_path):
    from retrieval.errors import UsageError

    with pytest.raises(UsageError, match="size"):
        build_demo_corpus(tmp_path, size=8)
    with pytest.raises(UsageError, match="limit"):
        build_demo_corpus(tmp_path, limit=0)


def test_cli_demo_json_and_contact_sheet(tmp_path, capsys):
    from cli.main import main

    sheet = tmp_path / "sheet.png"
    code = main(
        [
            "data",
            "demo",
            "--out",
            str(tmp_path / "cli"),
            "--size",
            "96",
            "--limit",
            "8",
            "--workers",
            "1",
            "--json",
            "--contact-sheet",
            str(sheet),
        ]
    )
    assert code == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["images"] == 8 and summary["cached"] is False and summary["problems"] == []
    with Image.open(sheet) as im:
        assert im.size[0] > 400
    assert main(["data", "demo", "--out", str(tmp_path / "cli"), "--size", "96", "--limit", "8", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["cached"] is True
