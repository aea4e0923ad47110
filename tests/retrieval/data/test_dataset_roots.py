"""A manifest remembers the dataset folder its importer read (Parquet metadata `cxr.dataset_root`): paths under it
pass the containment rule without --allow-outside, paths outside it and the manifest's folder are still refused,
and merge / split keep the roots (issue 25)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
from PIL import Image

from cli.main import main
from retrieval.data import dataset_roots
from retrieval.data.manifest import read_manifest, write_manifest
from retrieval.errors import ManifestError

REPORTS = ["No acute disease.", "Right pleural effusion.", "Cardiomegaly.", "Left lower lobe opacity."]


def _dataset(folder: Path, n: int = 4) -> Path:
    """A dataset folder as a user downloads it: images/ and a CSV naming them; returns the CSV."""
    (folder / "images").mkdir(parents=True)
    rng = np.random.default_rng(len(str(folder)))
    for i in range(n):
        Image.fromarray((rng.random((32, 32)) * 255).astype(np.uint8)).save(folder / "images" / f"im{i}.png")
    pd.DataFrame(
        {"image_path": [f"images/im{i}.png" for i in range(n)], "image_id": [f"{folder.name}{i}" for i in range(n)],
         "patient_id": [f"{folder.name}p{i}" for i in range(n)], "report": [REPORTS[i % 4] for i in range(n)]}
    ).to_csv(folder / "meta.csv", index=False)  # fmt: skip
    return folder / "meta.csv"


def _import(src: Path, out: Path) -> Path:
    out.parent.mkdir(parents=True, exist_ok=True)
    kind = "dicom" if src.is_dir() else "csv"
    assert main(["data", "import", kind, str(src), "--out", str(out), "--json"]) == 0
    return out


def test_an_imported_manifest_builds_an_index_without_the_flag(tmp_path, capsys):
    csv = _dataset(tmp_path / "dataset")
    manifest = _import(csv, tmp_path / "work" / "m.parquet")
    summary = json.loads(capsys.readouterr().out)
    root = os.path.realpath(tmp_path / "dataset")
    assert summary["dataset_roots"] == [root]
    metadata = pq.read_schema(manifest).metadata
    assert json.loads(metadata[b"cxr.dataset_root"]) == [root]
    df = read_manifest(manifest)
    assert dataset_roots.recorded_roots(df) == [root]
    assert all(Path(p).is_absolute() and p.startswith(root) for p in df["image_path"])  # outside the manifest's folder
    capsys.readouterr()
    assert main(["data", "validate", "--check-files", str(manifest)]) == 0
    assert f"dataset root(s) recorded by its import: {root}" in capsys.readouterr().out
    assert main(["index", "build", "-m", str(manifest), "--model", "cxr-tiny", "-o", str(tmp_path / "idx")]) == 0
    assert (tmp_path / "idx" / "CURRENT").is_file()
    # the recorded root is what lets it through: the same rows as CSV (no metadata) are refused
    write_manifest(df, tmp_path / "work" / "m.csv")
    capsys.readouterr()
    assert main(["index", "build", "-m", str(tmp_path / "work" / "m.csv"), "--model", "cxr-tiny",
                 "-o", str(tmp_path / "idx2")]) == 1  # fmt: skip
    assert "outside the manifest folder" in capsys.readouterr().err


def test_a_dicom_folder_import_records_its_folder(tmp_path):
    from dicom_maker import make_test_folder

    make_test_folder(tmp_path / "pacs")
    manifest = _import(tmp_path / "pacs", tmp_path / "work" / "pacs.parquet")
    assert dataset_roots.recorded_roots(read_manifest(manifest)) == [os.path.realpath(tmp_path / "pacs")]
    assert main(["data", "validate", "--check-files", str(manifest)]) == 0


def test_a_path_outside_the_recorded_root_is_still_refused(tmp_path, capsys):
    manifest = _import(_dataset(tmp_path / "dataset"), tmp_path / "work" / "m.parquet")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(elsewhere / "secret.png")
    (tmp_path / "dataset" / "images" / "link.png").symlink_to(elsewhere / "secret.png")
    df = read_manifest(manifest)
    for cell in (str(elsewhere / "secret.png"), str(tmp_path / "dataset" / "images" / "link.png")):
        bad = df.copy()
        bad.loc[0, "image_path"] = cell
        write_manifest(bad, manifest)
        assert dataset_roots.recorded_roots(read_manifest(manifest)) == dataset_roots.recorded_roots(df)
        capsys.readouterr()
        assert main(["index", "build", "-m", str(manifest), "--model", "cxr-tiny", "-o", str(tmp_path / "i")]) == 1
        err = capsys.readouterr().err
        assert "row 0" in err and "outside the manifest folder" in err and len(err.strip().splitlines()) == 1
        assert main(["eval", "retrieval", "--model", "cxr-tiny", "--manifest", str(manifest)]) == 1
        err = capsys.readouterr().err
        assert "outside the manifest folder" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "i").exists()


def test_a_recorded_root_that_does_not_exist_is_one_line(tmp_path, capsys):
    manifest = _import(_dataset(tmp_path / "dataset"), tmp_path / "work" / "m.parquet")
    (tmp_path / "dataset").rename(tmp_path / "moved")
    commands = (
        ["index", "build", "-m", str(manifest), "--model", "cxr-tiny", "-o", str(tmp_path / "i")],
        ["eval", "retrieval", "--model", "cxr-tiny", "--manifest", str(manifest)],
        ["query", str(manifest), "--index", str(tmp_path / "i"), "--out", str(tmp_path / "r.parquet")],
        ["data", "validate", str(manifest)],
    )
    for command in commands:
        capsys.readouterr()
        assert main(command) == 1
        captured = capsys.readouterr()
        text = captured.err if command[0] != "data" else captured.out
        assert "dataset root" in text and "does not exist" in text, command
        assert str(os.path.realpath(tmp_path)) in text
        if command[0] != "data":
            assert len(text.strip().splitlines()) == 1, text


def test_merge_keeps_both_roots_and_split_keeps_them(tmp_path, capsys):
    a = _import(_dataset(tmp_path / "a"), tmp_path / "work" / "a.parquet")
    b = _import(_dataset(tmp_path / "b"), tmp_path / "work" / "b.parquet")
    merged = tmp_path / "out" / "merged.parquet"
    merged.parent.mkdir()
    assert main(["data", "merge", str(a), str(b), "--out", str(merged)]) == 0
    roots = [os.path.realpath(tmp_path / "a"), os.path.realpath(tmp_path / "b")]
    assert dataset_roots.recorded_roots(read_manifest(merged)) == roots
    assert main(["data", "validate", "--check-files", str(merged)]) == 0
    resplit = tmp_path / "out2" / "resplit.parquet"
    resplit.parent.mkdir()
    assert main(["data", "split", str(merged), "--out", str(resplit), "--seed", "3"]) == 0
    assert dataset_roots.recorded_roots(read_manifest(resplit)) == roots
    assert main(["data", "validate", "--check-files", str(resplit)]) == 0


def test_merge_records_an_input_folder_its_rows_lie_in(tmp_path):
    """A manifest written inside its dataset (relative paths, no root) merged elsewhere: its folder becomes a root,
    so the merged rows pass without the flag."""
    csv = _dataset(tmp_path / "a")
    inside = _import(csv, tmp_path / "a" / "a.parquet")
    assert dataset_roots.recorded_roots(read_manifest(inside)) == []  # every path relative: no root needed
    other = _import(_dataset(tmp_path / "b"), tmp_path / "work" / "b.parquet")
    merged = tmp_path / "out" / "m.parquet"
    merged.parent.mkdir()
    assert main(["data", "merge", str(inside), str(other), "--out", str(merged)]) == 0
    roots = [os.path.realpath(tmp_path / name) for name in ("a", "b")]
    assert dataset_roots.recorded_roots(read_manifest(merged)) == roots
    assert main(["data", "validate", "--check-files", str(merged)]) == 0


def test_image_roots_prefers_the_folders_the_importer_read(tmp_path):
    (tmp_path / "data" / "images").mkdir(parents=True)
    (tmp_path / "other" / "x").mkdir(parents=True)
    paths = [str(tmp_path / "data" / "images" / "a.png"), str(tmp_path / "other" / "x" / "b.png"), ""]
    assert dataset_roots.image_roots(paths, [None, tmp_path / "data"]) == [
        os.path.realpath(tmp_path / "data"),
        os.path.realpath(tmp_path / "other" / "x"),
    ]
    assert dataset_roots.image_roots(["/a.png", "/usr/b.png"], []) == []  # never the file system's root
    assert dataset_roots.holding([str(tmp_path / "data"), str(tmp_path / "zzz")], paths[:1]) == [str(tmp_path / "data")]


@pytest.mark.parametrize(
    ("value", "reason"),
    [(b"not json", "is not a JSON list of absolute folders"), (b'"/one/string"', "is not a JSON list"),
     (b'["relative/path"]', "is not a JSON list"), (b"[1]", "is not a JSON list"),
     (b'["/"]', "names the file system's root"), (b'["/tmp", "//"]', "names the file system's root")],
)  # fmt: skip
def test_bad_root_metadata_is_one_line(tmp_path, value, reason):
    path = tmp_path / "m.parquet"
    write_manifest(pd.DataFrame({"image_id": ["a"], "study_id": ["s"], "patient_id": ["p"], "image_path": ["a.png"]}),
                   path)  # fmt: skip
    table = pq.read_table(path)
    pq.write_table(table.replace_schema_metadata({**table.schema.metadata, b"cxr.dataset_root": value}), path)
    with pytest.raises(ManifestError, match=f"cxr.dataset_root {reason}"):
        read_manifest(path)
