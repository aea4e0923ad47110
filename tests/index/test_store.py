"""The index folder: round trip, fingerprint check, and clear errors for missing, corrupt or inconsistent files."""

from __future__ import annotations

import json

import faiss
import numpy as np
import pandas as pd
import pytest

from index import generations, layout, store, verify
from index.factory import build_from_vectors
from retrieval.errors import IndexError_
from retrieval.fileio import sha256_file

faiss.omp_set_num_threads(1)


class Model:
    def __init__(self, name: str, fingerprint: str, embed_dim: int = 8):
        self.name, self.fingerprint, self.embed_dim = name, fingerprint, embed_dim


def _meta(n: int) -> pd.DataFrame:
    return pd.DataFrame(
        {
            "row_id": np.arange(n),
            "image_id": [f"i{i}" for i in range(n)],
            "study_id": [f"s{i // 2}" for i in range(n)],
            "patient_id": [f"p{i // 4}" for i in range(n)],
            "image_path": [f"/x/{i}.png" for i in range(n)],
            "view": "PA",
            "report": [f"r{i // 2}" for i in range(n)],
            "labels": [["Edema"] if i % 3 == 0 else ["No Finding"] for i in range(n)],
            "split": ["train" if i < n - 2 else "test" for i in range(n)],
            "source": "synthetic",
            "has_report": True,
        }
    )


@pytest.fixture
def saved(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(20, 8)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    images, _ = build_from_vectors(x)
    reports, _ = build_from_vectors(x[::-1].copy())
    model = Model("tiny-a", "f00d")
    info = {"factory": "Flat", "model": store.model_record(model), "created": layout.now_iso()}
    bad = pd.DataFrame({"row": [3], "image_id": ["b"], "path": ["/x/b.png"], "reason": ["empty file"]})
    path = generations.save_index(tmp_path / "idx", images, reports, _meta(20), info, bad)
    return path, x, model


def test_round_trip(saved):
    path, x, model = saved
    assert sorted(p.name for p in path.iterdir()) == [layout.LOCK_FILE, store.CURRENT_FILE, "gen-000001"]
    gen = store.resolve(path).gen_dir
    assert sorted(p.name for p in gen.iterdir()) == sorted(
        [store.READ_LOCK, store.IMAGES_FILE, store.REPORTS_FILE, store.META_FILE, store.INFO_FILE, store.BAD_FILE]
    )
    idx = store.open_index(path, model)
    assert idx.count == 20 and idx.dim == 8
    np.testing.assert_array_equal(idx.images.reconstruct_n(0, 20), x)
    np.testing.assert_array_equal(idx.reports.reconstruct_n(0, 20), x[::-1])
    written = _meta(20).columns  # the optional DICOM columns this meta lacks read back as ''
    pd.testing.assert_frame_equal(idx.meta[written].drop(columns="labels"), _meta(20).drop(columns="labels"))
    assert all((idx.meta[c] == "").all() for c in layout.OPTIONAL_META_COLUMNS)
    assert [list(v) for v in idx.meta["labels"]] == list(_meta(20)["labels"])
    info = json.loads((gen / store.INFO_FILE).read_text())
    assert info["metric"] == "inner_product" and info["count"] == 20 and info["dim"] == 8
    assert sorted(info["files"]) == sorted([store.IMAGES_FILE, store.REPORTS_FILE, store.META_FILE, store.BAD_FILE])
    assert info["bad_images"] == 1
    assert list(store.read_bad(path)["reason"]) == ["empty file"]
    assert not list(path.glob("**/.*.tmp"))  # no temporary files left


def test_fingerprint_mismatch_is_refused_naming_both(saved):
    path, _, _ = saved
    with pytest.raises(IndexError_) as e:
        store.open_index(path, Model("tiny-b", "beef"))
    msg = str(e.value)
    assert "f00d" in msg and "beef" in msg and "tiny-a" in msg and "tiny-b" in msg


def test_missing_and_corrupt_folders(saved, tmp_path):
    path, _, model = saved
    with pytest.raises(IndexError_, match="no index folder"):
        store.open_index(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(IndexError_, match="not an index folder"):
        store.open_index(tmp_path / "empty")
    gen = store.resolve(path).gen_dir
    (gen / store.IMAGES_FILE).write_bytes(b"garbage")
    with pytest.raises(IndexError_, match="images.faiss: damaged"):
        store.open_index(path, model)


def _repoint(path, text: str) -> None:
    """Rewrite the info file and re-sign the pointer (so only the schema check stands in the way)."""
    gen = store.resolve(path).gen_dir
    (gen / store.INFO_FILE).write_text(text)
    (path / store.CURRENT_FILE).write_text(f"{gen.name} {sha256_file(gen / store.INFO_FILE)}\n")


def test_bad_info_json(saved):
    path, _, _ = saved
    _repoint(path, "{not json")
    with pytest.raises(IndexError_, match="unreadable"):
        store.open_index(path)
    _repoint(path, "{}")
    with pytest.raises(IndexError_, match="missing 'factory'"):
        store.open_index(path)


def test_inconsistent_row_counts_are_detected(saved):
    path, _, model = saved
    gen = store.resolve(path).gen_dir
    info = json.loads((gen / store.INFO_FILE).read_text())
    generations.write_meta(_meta(18), gen / store.META_FILE)  # files that disagree, with matching checksums
    info["files"][store.META_FILE] = layout.file_record(gen / store.META_FILE)
    _repoint(path, json.dumps(info))
    with pytest.raises(IndexError_, match="meta.parquet has 18"):
        store.open_index(path, model)


def test_refuses_to_write_inconsistent_index(tmp_path):
    x = np.eye(4, dtype=np.float32)
    a, _ = build_from_vectors(x)
    with pytest.raises(IndexError_, match="inconsistent"):
        generations.save_index(tmp_path / "i", a, a, _meta(3), {"factory": "Flat", "model": {}})


def test_summary(saved):
    path, _, _ = saved
    s = verify.index_summary(path)
    assert s["rows"] == 20 and s["studies"] == 10 and s["patients"] == 5
    assert s["splits"] == {"train": 18, "test": 2}
    assert s["labels"] == {"No Finding": 13, "Edema": 7}
    assert s["bad_images"] == 1 and s["model"]["fingerprint"] == "f00d"
    assert s["files"][store.IMAGES_FILE] > 0
