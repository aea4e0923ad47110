"""`cxr data import` and `cxr data validate` through the CLI entry point: output, files, exit codes."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cli.main import main
from retrieval.data.manifest import read_manifest, resolve_image_path


@pytest.fixture
def yolo_folder(tmp_path) -> Path:
    root = tmp_path / "tb"
    (root / "images").mkdir(parents=True)
    (root / "labels").mkdir()
    (root / "data.yaml").write_text("names:\n  0: Active Tuberculosis\n  1: Obsolete Pulmonary TB\n")
    for k in range(12):
        Image.fromarray(np.full((16, 16), k * 20, dtype=np.uint8)).save(root / "images" / f"tb{k:02d}.png")
        (root / "labels" / f"tb{k:02d}.txt").write_text(f"{k % 2} 0.5 0.5 0.2 0.2\n")
    (root / "labels" / "tb03.txt").write_text("0 0.5 0.5\n")  # a bad line: reported, image kept
    return root


def test_import_prints_summary_and_writes_manifest(yolo_folder, tmp_path, capsys):
    out = tmp_path / "out" / "tb.parquet"
    assert main(["data", "import", "yolo", str(yolo_folder), "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "images" in text and "12" in text and "Tuberculosis" in text and "Active Tuberculosis" in text
    assert "problems: 1" in text and "tb03.txt line 1" in text
    df = read_manifest(out)
    assert len(df) == 12 and df["boxes"].map(len).sum() == 11
    assert all(resolve_image_path(df.attrs["root"], p).is_file() for p in df["image_path"])


def test_import_json_and_paths_relative_to_manifest_folder(yolo_folder, capsys):
    out = yolo_folder / "manifest.parquet"  # inside the dataset: image paths stored relative
    assert main(["data", "import", "yolo", str(yolo_folder), "--out", str(out), "--json", "--seed", "1"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert (summary["images"], summary["studies"], summary["patients"], summary["boxes"]) == (12, 12, 12, 11)
    assert summary["labels"] == {"Tuberculosis": 11} and len(summary["problems"]) == 1
    assert sum(summary["splits"].values()) == 12 and summary["out"] == str(out)
    df = read_manifest(out)
    assert df["image_path"].tolist()[0] == "images/tb00.png"


def test_import_errors(tmp_path, capsys):
    assert main(["data", "import", "dicomdir", str(tmp_path), "--out", str(tmp_path / "m.parquet")]) == 2
    assert "unknown import kind" in capsys.readouterr().err
    assert main(["data", "import", "covid-cxr", str(tmp_path), "--out", str(tmp_path / "m.parquet")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "metadata.csv not found" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "m.parquet").exists()


def _write_csv(path: Path, rows: list[str]) -> Path:
    path.write_text("image_id,study_id,patient_id,image_path,labels,split\n" + "\n".join(rows) + "\n")
    return path


def test_validate_good_and_bad(tmp_path, capsys):
    (tmp_path / "a.png").write_bytes(b"x")
    good = _write_csv(tmp_path / "good.csv", ["a,s1,p1,a.png,Edema,train", "b,s2,p2,b.png,,test"])
    assert main(["data", "validate", str(good)]) == 0
    assert "2 rows, no problems" in capsys.readouterr().out
    assert main(["data", "validate", str(good), "--check-files"]) == 1  # b.png does not exist
    assert "row 1 (image_id 'b'): image_path: file not found" in capsys.readouterr().out

    bad = _write_csv(tmp_path / "bad.csv", ["a,s1,p1,a.png,Dragon,train", "a,s2,p1,a.png,,test"])
    assert main(["data", "validate", str(bad), "--json"]) == 1
    report = json.loads(capsys.readouterr().out)
    found = {(p["row"], p["column"]) for p in report["problems"]}
    assert found == {(0, "labels"), (1, "image_id"), (1, "patient_id")} and report["rows"] == 2


def test_validate_missing_manifest(tmp_path, capsys):
    assert main(["data", "validate", str(tmp_path / "none.parquet")]) == 1
    assert "manifest not found" in capsys.readouterr().err


@pytest.mark.realdata
@pytest.mark.parametrize(
    "kind, folder, expected",
    [
        ("covid-cxr", "covid-cxr", {"images": 296, "patients": 190, "boxes": 592}),
        ("yolo", "tbx11k-tb", {"images": 600}),
    ],
)
def test_real_imports_through_the_cli(shared_data, tmp_path, capsys, kind, folder, expected):
    out = tmp_path / f"{kind}.parquet"
    assert main(["data", "import", kind, str(shared_data / folder), "--out", str(out), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert {k: summary[k] for k in expected} == expected
    # the images stay in ../shared, outside the manifest's folder, under the dataset root the import recorded
    # (issue 25): build, train and validate read them without --allow-outside
    assert summary["dataset_roots"] == [os.path.realpath(shared_data / folder)]
    assert main(["data", "validate", str(out), "--check-files"]) == 0
