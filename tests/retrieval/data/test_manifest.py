"""The study manifest: Parquet and CSV round trips, validation of each kind of bad row, splits, summary."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from retrieval.data.manifest import (
    COLUMNS,
    Problem,
    assign_splits,
    normalize_manifest,
    read_manifest,
    resolve_image_path,
    write_manifest,
)
from retrieval.data.manifest_check import summarize_manifest, validate_manifest
from retrieval.errors import ManifestError
from retrieval.labels import LABELS


def _good(n: int = 6) -> pd.DataFrame:
    return pd.DataFrame(
        {
            "image_id": [f"i{k}" for k in range(n)],
            "study_id": [f"s{k // 2}" for k in range(n)],
            "patient_id": [f"p{k // 2}" for k in range(n)],
            "image_path": [f"img/i{k}.png" for k in range(n)],
            "view": ["PA", "LATERAL"] * (n // 2),
            "report": ["Heart is enlarged."] * n,
            "labels": [["Cardiomegaly"], ["Cardiomegaly", "Pleural Effusion"]] * (n // 2),
            "boxes": [[{"label": "Cardiomegaly", "x1": 0.3, "y1": 0.4, "x2": 0.7, "y2": 0.8}], []] * (n // 2),
            "split": ["train", "train", "val", "val", "test", "test"][:n],
            "source": "unit",
            "score": np.arange(n, dtype=float),  # an extra column survives
        }
    )


def test_label_vocabulary_is_chexpert_plus_tb():
    assert len(LABELS) == 15 and "No Finding" in LABELS and "Tuberculosis" in LABELS


@pytest.mark.parametrize("suffix", [".parquet", ".csv"])
def test_round_trip(tmp_path, suffix):
    df = _good()
    path = write_manifest(df, tmp_path / f"m{suffix}")
    back = read_manifest(path)
    assert list(back.columns[: len(COLUMNS)]) == list(COLUMNS) and "score" in back.columns
    assert back["labels"].tolist() == df["labels"].tolist()
    assert back["boxes"].tolist() == df["boxes"].tolist()
    assert back["image_id"].tolist() == df["image_id"].tolist()
    assert back.attrs["root"] == str(tmp_path.resolve())
    assert validate_manifest(back) == []


def test_extra_list_column_round_trips_as_lists(tmp_path):
    df = _good(2)
    df["mesh"] = [["Cardiomegaly/mild", "Opacity"], []]
    write_manifest(df, tmp_path / "m.parquet")
    back = read_manifest(tmp_path / "m.parquet")
    assert back["mesh"].tolist() == [["Cardiomegaly/mild", "Opacity"], []]
    assert all(isinstance(v, list) for v in back["mesh"])


def test_parquet_column_types(tmp_path):
    write_manifest(_good(), tmp_path / "m.parquet")
    schema = pq.read_schema(tmp_path / "m.parquet")
    assert str(schema.field("labels").type) == "list<element: string>"
    assert "string" in str(schema.field("boxes").type)  # JSON text
    raw = pq.read_table(tmp_path / "m.parquet").to_pandas()
    assert json.loads(raw["boxes"].iloc[0])[0]["label"] == "Cardiomegaly"


def test_csv_accepts_pipe_separated_labels_and_missing_optional_columns(tmp_path):
    (tmp_path / "m.csv").write_text(
        "image_id,study_id,patient_id,image_path,labels,split\n"
        "a,s1,p1,a.png,Cardiomegaly|Edema,train\n"
        'b,s2,p2,/abs/b.png,"[""Pneumothorax""]",validate\n'
        "c,s3,p3,c.png,,test\n"
    )
    df = read_manifest(tmp_path / "m.csv")
    assert df["labels"].tolist() == [["Cardiomegaly", "Edema"], ["Pneumothorax"], []]
    assert df["boxes"].tolist() == [[], [], []] and df["report"].tolist() == ["", "", ""]
    assert df["split"].tolist() == ["train", "val", "test"]  # "validate" (MIMIC's spelling) becomes val
    assert validate_manifest(df) == []


def test_write_is_atomic_and_leaves_no_temp_file(tmp_path, monkeypatch):
    path = tmp_path / "m.parquet"
    write_manifest(_good(), path)
    before = path.read_bytes()
    import pyarrow.parquet as pq_mod

    def boom(*a, **k):
        raise RuntimeError("disk full")

    monkeypatch.setattr(pq_mod, "write_table", boom)
    with pytest.raises(RuntimeError):
        write_manifest(_good(2), path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["m.parquet"]


def test_write_refuses_unknown_format(tmp_path):
    with pytest.raises(ManifestError, match=".parquet or .csv"):
        write_manifest(_good(), tmp_path / "m.pq")
    assert not list(tmp_path.iterdir())


def test_read_errors(tmp_path):
    with pytest.raises(ManifestError, match="not found"):
        read_manifest(tmp_path / "none.parquet")
    (tmp_path / "bad.parquet").write_bytes(b"not parquet at all")
    with pytest.raises(ManifestError, match="cannot read manifest"):
        read_manifest(tmp_path / "bad.parquet")


def test_resolve_image_path(tmp_path):
    assert resolve_image_path(tmp_path, "img/a.png") == tmp_path / "img" / "a.png"
    assert resolve_image_path(tmp_path, "/data/a.png").as_posix() == "/data/a.png"
    with pytest.raises(ManifestError, match="empty"):
        resolve_image_path(tmp_path, "")


def _where(problems: list[Problem]) -> set[tuple[int | None, str]]:
    return {(p.row, p.column) for p in problems}


def test_validate_reports_each_bad_row(tmp_path):
    df = _good()
    df.loc[0, "image_id"] = ""
    df.loc[1, "patient_id"] = ""
    df.loc[3, "image_id"] = "i2"  # duplicate of row 2
    df.at[2, "labels"] = ["Cardiomegaly", "Dragon"]
    df.at[4, "boxes"] = [{"label": "Edema", "x1": 0.5, "y1": 0.1, "x2": 0.4, "y2": 0.3}]  # x2 <= x1
    df.at[5, "boxes"] = [{"label": "Edema", "x1": 0.1, "y1": 0.1, "x2": 1.2, "y2": 0.3}]  # out of [0, 1]
    df.loc[5, "split"] = "holdout"
    problems = validate_manifest(df)
    assert _where(problems) == {
        (0, "image_id"),
        (1, "patient_id"),
        (3, "image_id"),
        (2, "labels"),
        (4, "boxes"),
        (5, "boxes"),
        (5, "split"),
    }
    text = {str(p) for p in problems}
    assert "row 3 (image_id 'i2'): image_id: duplicate of row 2" in text
    assert "row 2 (image_id 'i2'): labels: 'Dragon' is not in the label vocabulary" in text
    assert any("outside [0, 1]" in t for t in text) and any("x2<=x1" in t for t in text)
    assert any("unknown split 'holdout'" in t for t in text)
    assert all(set(p.to_dict()) == {"row", "image_id", "column", "message"} for p in problems)


def test_validate_patient_in_two_splits():
    df = _good()
    df.loc[3, "split"] = "test"  # patient p1: rows 2 (val) and 3 (test)
    problems = validate_manifest(df)
    assert _where(problems) == {(3, "patient_id")}
    assert "patient 'p1' is in two splits: val (row 2), test (row 3)" in str(problems[0])


def test_validate_missing_columns_and_unparseable_cells(tmp_path):
    problems = validate_manifest(pd.DataFrame({"image_id": ["a"], "image_path": ["a.png"]}))
    assert _where(problems) == {(None, "study_id"), (None, "patient_id")}
    (tmp_path / "m.csv").write_text(
        "image_id,study_id,patient_id,image_path,labels,boxes,split\n"
        'a,s,p,a.png,"[""Edema""","[{""label"": ""x""}]",train\n'
    )
    problems = validate_manifest(read_manifest(tmp_path / "m.csv"))
    assert _where(problems) == {(0, "labels"), (0, "boxes")}
    assert "lacks x1, y1, x2, y2" in str(problems[1]) or "lacks x1, y1, x2, y2" in str(problems[0])


def test_validate_check_files(tmp_path):
    df = _good(2)
    (tmp_path / "img").mkdir()
    (tmp_path / "img" / "i0.png").write_bytes(b"x")
    df.loc[1, "image_path"] = ""
    assert validate_manifest(df, root=tmp_path) == []  # files are not checked unless asked
    problems = validate_manifest(df, root=tmp_path, check_files=True)
    assert _where(problems) == {(1, "image_path")}
    df.loc[1, "image_path"] = "img/gone.png"
    assert "file not found" in str(validate_manifest(df, root=tmp_path, check_files=True)[0])


def test_assign_splits_by_patient_is_deterministic_and_disjoint():
    rng = np.random.default_rng(0)
    patients = [f"p{k}" for k in rng.integers(0, 200, size=1000)]
    ids = [f"i{k}" for k in range(1000)]
    df = pd.DataFrame({"image_id": ids, "patient_id": patients, "study_id": patients})
    a = assign_splits(df, seed=1)
    assert (
        a["split"].tolist() == assign_splits(df.sample(frac=1, random_state=3), seed=1).sort_index()["split"].tolist()
    )
    assert a.groupby("patient_id")["split"].nunique().max() == 1  # never a patient in two splits
    per_split = a.groupby("split")["patient_id"].nunique()
    n = df["patient_id"].nunique()
    assert abs(per_split["train"] - 0.8 * n) <= 1 and abs(per_split["val"] - 0.1 * n) <= 1
    assert a["split"].tolist() != assign_splits(df, seed=2)["split"].tolist()
    half = assign_splits(df, {"train": 0.5, "test": 0.5}, seed=0)
    assert set(half["split"]) == {"train", "test"}
    with pytest.raises(ManifestError):
        assign_splits(df, {"train": 0.5, "holdout": 0.5})


def test_summarize():
    df = normalize_manifest(_good())
    df.loc[0, "image_path"] = ""
    s = summarize_manifest(df, problems=["row 9: skipped"])
    assert (s["studies"], s["images"], s["patients"]) == (3, 6, 3)
    assert s["labels"] == {"Cardiomegaly": 6, "Pleural Effusion": 3}
    assert s["boxes"] == 3 and s["boxes_per_label"] == {"Cardiomegaly": 3}
    assert s["splits"] == {"train": 2, "val": 2, "test": 2} and s["views"] == {"PA": 3, "LATERAL": 3}
    assert s["images_without_file"] == 1 and s["problems"] == ["row 9: skipped"]
    json.dumps(s)  # JSON-ready for --json
    df.loc[1, "split"] = "holdout"
    assert summarize_manifest(df)["problems"] == [
        "row 1 (image_id 'i1'): split: unknown split 'holdout' (expected one of ('train', 'val', 'test'))"
    ]


def test_an_image_path_with_a_nul_byte_is_one_manifest_error(tmp_path):
    """Found by fuzzing: the containment check's realpath raised ValueError on a NUL byte."""
    from retrieval.data.manifest import resolve_image_path
    from retrieval.errors import ManifestError

    with pytest.raises(ManifestError, match="NUL byte"):
        resolve_image_path(tmp_path, "a\x00b.png", allow_outside=False)
