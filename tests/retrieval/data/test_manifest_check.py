"""One containment rule for every command that reads a manifest: an image path must stay inside the manifest's
folder after resolving symlinks, unless --allow-outside (issue 29, items 17-19)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from cli.main import main
from retrieval.data.manifest import resolve_image_path, write_manifest
from retrieval.errors import ManifestError


@pytest.fixture
def folders(tmp_path) -> tuple[Path, Path]:
    """A manifest folder holding one real image, a link to a file outside, a link to a folder outside, and a link
    that stays inside; and the outside folder."""
    inside, outside = tmp_path / "data", tmp_path / "elsewhere"
    (inside / "images").mkdir(parents=True)
    outside.mkdir()
    pixels = (np.random.default_rng(0).random((16, 16)) * 255).astype(np.uint8)
    Image.fromarray(pixels).save(inside / "images" / "ok.png")
    Image.fromarray(pixels).save(outside / "secret.png")
    (inside / "images" / "file-link.png").symlink_to(outside / "secret.png")
    (inside / "dir-link").symlink_to(outside)
    (inside / "images" / "inner-link.png").symlink_to(inside / "images" / "ok.png")
    return inside, outside


@pytest.mark.parametrize("cell", ["images/file-link.png", "dir-link/secret.png"])
def test_a_symlink_out_of_the_manifest_folder_is_outside(folders, cell):
    inside, _ = folders
    with pytest.raises(ManifestError, match="outside the manifest folder"):
        resolve_image_path(inside, cell, allow_outside=False)
    assert resolve_image_path(inside, cell, allow_outside=True).is_file()  # explicitly allowed


def test_paths_and_links_that_stay_inside_are_fine(folders):
    inside, _ = folders
    for cell in ("images/ok.png", "images/inner-link.png", "images/../images/ok.png"):
        assert resolve_image_path(inside, cell, allow_outside=False).is_file()


def _manifest(folder: Path, paths: list[str]) -> Path:
    rows = [{"image_id": f"i{i}", "study_id": f"s{i}", "patient_id": f"p{i}", "image_path": p, "view": "PA",
             "report": "No acute disease.", "labels": ["No Finding"], "split": "test", "source": "x"}
            for i, p in enumerate(paths)]  # fmt: skip
    path = folder / "manifest.parquet"
    write_manifest(pd.DataFrame(rows), path)
    return path


@pytest.mark.parametrize("cell", ["images/file-link.png", "dir-link/secret.png", "ABSOLUTE"])
def test_validate_reports_what_the_build_refuses(folders, cell, capsys):
    inside, outside = folders
    cell = str(outside / "secret.png") if cell == "ABSOLUTE" else cell
    manifest = _manifest(inside, ["images/ok.png", cell])
    assert main(["data", "validate", "--check-files", str(manifest)]) == 1
    out = capsys.readouterr().out
    assert "outside the manifest folder" in out and "no problems" not in out
    assert main(["data", "validate", "--check-files", "--allow-outside", str(manifest)]) == 0
    assert main(["index", "build", "-m", str(manifest), "--model", "cxr-tiny", "-o", str(inside / "idx")]) == 1
    assert "outside the manifest folder" in capsys.readouterr().err


@pytest.mark.parametrize("cell", ["images/file-link.png", "ABSOLUTE"])
def test_query_of_a_manifest_applies_the_same_rule(folders, cell, tmp_path, capsys):
    inside, outside = folders
    cell = str(outside / "secret.png") if cell == "ABSOLUTE" else cell
    manifest = _manifest(inside, [cell])
    code = main(["query", str(manifest), "--index", str(tmp_path / "no-index"), "--out", str(tmp_path / "r.parquet")])
    err = capsys.readouterr().err
    assert code == 1 and "outside the manifest folder" in err and "--allow-outside" in err
    assert len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("command", [["eval", "retrieval", "--model", "cxr-tiny"],
                                     ["eval", "generation", "--vlm", "no-vlm"]])  # fmt: skip
def test_the_eval_commands_apply_the_same_rule(folders, command, capsys):
    inside, _ = folders
    manifest = _manifest(inside, ["images/ok.png", "dir-link/secret.png"])
    assert main([*command, "--manifest", str(manifest)]) == 1
    err = capsys.readouterr().err
    assert "row 1" in err and "outside the manifest folder" in err and len(err.strip().splitlines()) == 1
