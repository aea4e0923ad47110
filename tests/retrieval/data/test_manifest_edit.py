"""retrieval/data/manifest_edit.py and `cxr data merge` / `cxr data split`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cli.main import main
from retrieval.data.manifest import read_manifest, resolve_image_path


def _manifest(folder: Path, rows: list[tuple[str, str, str]], name: str = "m.csv") -> Path:
    """A CSV manifest in `folder` with an image file per row: rows of (image_id, patient_id, split)."""
    folder.mkdir(parents=True, exist_ok=True)
    lines = ["image_id,study_id,patient_id,image_path,labels,split"]
    for image_id, patient, split in rows:
        (folder / f"{image_id}.png").write_bytes(image_id.encode())
        lines.append(f"{image_id},s-{image_id},{patient},{image_id}.png,Edema,{split}")
    path = folder / name
    path.write_text("\n".join(lines) + "\n")
    return path


def _files(manifest: Path) -> dict[str, bytes]:
    df = read_manifest(manifest)
    return {i: resolve_image_path(df.attrs["root"], p).read_bytes() for i, p in zip(df["image_id"], df["image_path"])}


def test_merge_rewrites_paths_to_the_new_folder(tmp_path, capsys):
    a = _manifest(tmp_path / "a", [("a1", "p1", "train"), ("a2", "p2", "test")])
    b = _manifest(tmp_path / "deep" / "b", [("b1", "p3", "train")])
    out = tmp_path / "out" / "all.parquet"
    assert main(["data", "merge", str(a), str(b), "--out", str(out), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["rows"] == 3 and summary["problems"] == []
    assert _files(out) == {"a1": b"a1", "a2": b"a2", "b1": b"b1"}  # every row still opens its own file
    assert read_manifest(out)["split"].tolist() == ["train", "test", "train"]


def test_merge_refuses_shared_ids_unless_prefixed(tmp_path, capsys):
    a = _manifest(tmp_path / "a", [("x", "p1", "train")], name="covid.csv")
    b = _manifest(tmp_path / "b", [("x", "p1", "test")], name="tb.csv")
    out = tmp_path / "all.parquet"
    assert main(["data", "merge", str(a), str(b), "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert "image_id 'x' is in both" in err and "--prefix" in err and len(err.strip().splitlines()) == 1
    assert not out.exists()
    assert main(["data", "merge", str(a), str(b), "--out", str(out), "--prefix"]) == 0
    df = read_manifest(out)
    assert df["image_id"].tolist() == ["covid:x", "tb:x"] and df["patient_id"].tolist() == ["covid:p1", "tb:p1"]


def test_merge_reports_a_patient_in_two_splits(tmp_path, capsys):
    a = _manifest(tmp_path / "a", [("a1", "p1", "train")])
    b = _manifest(tmp_path / "b", [("b1", "p1", "test")])
    assert main(["data", "merge", str(a), str(b), "--out", str(tmp_path / "m.parquet")]) == 0
    assert "1 patient(s) are in more than one split" in capsys.readouterr().out


def test_split_is_patient_disjoint_and_seeded(tmp_path, capsys):
    rows = [(f"i{k}", f"p{k // 3}", "train") for k in range(60)]  # 20 patients, 3 images each
    src = _manifest(tmp_path / "src", rows)
    outs = [tmp_path / f"o{seed}.parquet" for seed in (1, 1, 2)]
    for out, seed in zip(outs, (1, 1, 2)):
        assert main(["data", "split", str(src), "--out", str(out), "--seed", str(seed)]) == 0
    first, again, other = (read_manifest(o) for o in outs)
    assert first["split"].tolist() == again["split"].tolist()
    assert first["split"].tolist() != other["split"].tolist()
    assert (first.groupby("patient_id")["split"].nunique() == 1).all()
    assert first["split"].value_counts().to_dict() == {"train": 48, "val": 6, "test": 6}
    assert _files(outs[0])["i7"] == b"i7"


@pytest.mark.parametrize("fractions", ["train=0.8,dev=0.2", "train=x", "", "train"])
def test_split_refuses_bad_fractions(tmp_path, capsys, fractions):
    src = _manifest(tmp_path / "src", [("i1", "p1", "train")])
    assert main(["data", "split", str(src), "--out", str(tmp_path / "o.parquet"), "--fractions", fractions]) == 2
    assert "split fraction" in capsys.readouterr().err
