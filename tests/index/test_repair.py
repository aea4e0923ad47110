"""No command deletes an index it cannot read: a folder with generations but no readable CURRENT is refused by
build, add, gc and info, naming the newest intact generation and `cxr index repair`, which restores the pointer
(issue 29, item 4). `verify` refuses unrecorded files; `info` checks the structure it reports."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import faiss
import pytest
from index_helpers import FakeModel, make_corpus

from cli.main import main
from index import store
from index.build import BuildOptions, add_to_index, build_index
from index.generations import gc_index, repair_index
from index.layout import CURRENT_FILE
from index.verify import index_summary, verify_index
from retrieval.data.manifest import read_manifest, write_manifest
from retrieval.errors import IndexError_

faiss.omp_set_num_threads(1)
OPTS = {"batch_size": 8, "workers": 0, "shard_rows": 16, "progress": False}


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    """An index with two commits (build, then add): its current generation is gen-000002."""
    folder = tmp_path_factory.mktemp("corpus")
    manifest = make_corpus(folder, n=24, bad=False)
    df = read_manifest(manifest)
    first, second = folder / "first.parquet", folder / "second.parquet"
    write_manifest(df.iloc[:16], first)
    write_manifest(df.iloc[16:], second)
    out = folder / "index"
    build_index(first, FakeModel(), out, BuildOptions(**OPTS))
    add_to_index(out, second, FakeModel(), BuildOptions(**OPTS))
    assert store.resolve(out).name == "gen-000002"
    return out


@pytest.fixture
def index(source, tmp_path) -> Path:
    out = tmp_path / "index"
    shutil.copytree(source, out)
    return out


LOST = r"CURRENT.*newest intact generation is gen-000002.*cxr index repair"


@pytest.mark.parametrize("damage", ["missing", "garbage", "points-nowhere"])
def test_a_lost_pointer_is_refused_by_every_writer_and_repaired(index, source, damage):
    pointer = index / CURRENT_FILE
    if damage == "missing":
        pointer.unlink()
    elif damage == "garbage":
        pointer.write_bytes(b"\x00garbage")
    else:
        pointer.write_text(f"gen-000009 {'0' * 64}\n")
    for action in (
        lambda: store.read_info(index),
        lambda: build_index(read_manifest(source.parent / "first.parquet"), FakeModel(), index, BuildOptions(**OPTS)),
        lambda: add_to_index(index, source.parent / "second.parquet", FakeModel(), BuildOptions(**OPTS)),
        lambda: gc_index(index),
        lambda: index_summary(index),
    ):
        with pytest.raises(IndexError_, match=LOST):
            action()
        assert (index / "gen-000002" / "images.faiss").is_file()  # nothing was deleted
    assert main(["index", "repair", str(index)]) == 0
    assert store.open_index(index, FakeModel()).count == 24
    assert verify_index(index)["generation"] == "gen-000002"
    assert main(["index", "repair", str(index)]) == 0  # a healthy folder: nothing to do


def test_repair_skips_a_damaged_newer_generation(index, capsys):
    shutil.copytree(index / "gen-000002", index / "gen-000003")
    data = bytearray((index / "gen-000003" / "images.faiss").read_bytes())
    data[len(data) // 2] ^= 0x10
    (index / "gen-000003" / "images.faiss").write_bytes(bytes(data))
    (index / CURRENT_FILE).unlink()
    assert main(["index", "gc", str(index)]) == 1
    err = capsys.readouterr().err
    assert "newest intact generation is gen-000002" in err and len(err.strip().splitlines()) == 1
    assert main(["index", "repair", str(index)]) == 0
    assert store.resolve(index).name == "gen-000002"


def test_a_folder_with_only_an_unfinished_generation_is_not_an_index(index):
    """A first commit killed before CURRENT leaves a generation that does not verify: a rerun may remove it."""
    (index / CURRENT_FILE).unlink()
    shutil.rmtree(index / "gen-000002")
    (index / "gen-000001").mkdir()
    (index / "gen-000001" / "images.faiss").write_bytes(b"half")
    with pytest.raises(IndexError_, match="not an index folder"):
        store.read_info(index)
    with pytest.raises(IndexError_, match="no intact generation"):
        repair_index(index)


def test_verify_refuses_an_unrecorded_file(index):
    (index / "gen-000002" / "extra.bin").write_bytes(b"dropped in")
    with pytest.raises(IndexError_, match=r"extra\.bin: not recorded"):
        verify_index(index)


def _rewrite_info(index: Path, **changes) -> None:
    """Change the current info record and re-checksum the pointer (a consistent lie, not damage)."""
    ref = store.resolve(index)
    info = json.loads(ref.info_path.read_text())
    info.update(changes)
    ref.info_path.write_text(json.dumps(info))
    sha = hashlib.sha256(ref.info_path.read_bytes()).hexdigest()
    (index / CURRENT_FILE).write_text(f"{ref.name} {sha}\n")


@pytest.mark.parametrize(
    ("changes", "match"),
    [({"dim": 16}, "dimension"), ({"factory": "IVF4,Flat"}, "factory"), ({"factory": "Nonsense!!"}, "factory")],
)
def test_info_checks_the_structure_it_reports(index, changes, match):
    index_summary(index)  # as written: fine
    _rewrite_info(index, **changes)
    with pytest.raises(IndexError_, match=match):
        index_summary(index)


def test_a_first_build_killed_before_its_pointer_is_finished_by_the_rerun(source, tmp_path):
    """A kill after the first generation was verified but before CURRENT was written: rerunning the same build
    adopts it (exit 0, nothing encoded again); another manifest is refused by the lost-pointer rule."""
    out = tmp_path / "first"
    first = source.parent / "first.parquet"
    build_index(first, FakeModel(), out, BuildOptions(**OPTS))
    (out / CURRENT_FILE).unlink()
    with pytest.raises(IndexError_, match=LOST.replace("000002", "000001")):
        build_index(source.parent / "second.parquet", FakeModel(), out, BuildOptions(**OPTS))
    again = build_index(first, FakeModel(), out, BuildOptions(**OPTS))
    assert again.already_done and again.encoded_rows == 0 and store.resolve(out).name == "gen-000001"
