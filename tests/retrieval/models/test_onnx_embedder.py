"""`retrieval.models.onnx_embedder` and the fast `cxr query IMAGE`: the ONNX graph embeds as the torch path does,
a changed graph is never used, the query answers without importing torch, and the table fits 80 columns."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
from gen_synth import make_manifest
from repo_paths import REPO
from run_python import run_python

from cli.main import main
from retrieval.models import onnx_cache, onnx_embedder


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(root, manifest, cxr-tiny saved folder, an index of it that records the folder), the graph exported."""
    from index.build import BuildOptions, build_index
    from retrieval.models import load_model

    root = tmp_path_factory.mktemp("onnx-query")
    df = make_manifest(root, n=12, size=96)
    df.loc[0, "report"] = "The heart is enlarged, with a cardiothoracic ratio well above the normal range today. " * 2
    model = load_model("cxr-tiny", device="cpu")
    model.save(root / "model")
    build_index(df, model, root / "idx", options=BuildOptions(workers=0, progress=False, model_path=root / "model"))
    assert onnx_embedder.export_embedder(model) is not None
    assert onnx_cache.check_exports(onnx_cache.cache_dir()) == []  # `cxr models verify` finds it intact
    return root, df, model


def _images() -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    return [rng.random(shape).astype(np.float32) for shape in ((96, 96), (300, 180), (40, 70), (224, 224))]


def test_the_graph_embeds_as_the_torch_path(tiny):
    _, _, model = tiny
    embedder = onnx_embedder.open_embedder(model.fingerprint)
    assert embedder is not None
    images = _images()
    want = model.encode_images(images, device="cpu", precision="fp32")
    got = np.concatenate([embedder.encode(img) for img in images])
    assert got.dtype == np.float32 and got.shape == want.shape
    np.testing.assert_allclose(got, want, atol=1e-4)
    for img in images:  # the preprocessing alone, against GreyImageTransform's
        np.testing.assert_allclose(embedder.preprocess(img), model.image_transform()(img).numpy(), atol=1e-4)


def test_a_changed_or_foreign_graph_is_not_used(tiny, monkeypatch, tmp_path):
    import shutil

    _, _, model = tiny
    fp = model.fingerprint
    assert onnx_embedder.open_embedder("0" * 64) is None  # nothing exported for that model
    monkeypatch.setenv("CXR_IMAGE_RUNTIME", "torch")
    assert onnx_embedder.open_embedder(fp) is None
    monkeypatch.delenv("CXR_IMAGE_RUNTIME")
    copy = tmp_path / "onnx"
    shutil.copytree(onnx_cache.cache_dir(), copy)
    monkeypatch.setenv("CXR_ONNX_DIR", str(copy))
    graph = onnx_embedder._paths(fp)[0]
    data = bytearray(graph.read_bytes())
    data[len(data) // 2] ^= 0x01
    graph.write_bytes(bytes(data))
    assert onnx_embedder.open_embedder(fp) is None  # its checksum no longer matches
    assert onnx_embedder.export_embedder(model, fp) == graph  # so the next query writes it again
    assert onnx_embedder.open_embedder(fp) is not None


def test_cpu_only_reads_the_device_without_torch(monkeypatch):
    assert onnx_embedder.cpu_only("cpu") and not onnx_embedder.cpu_only("cuda:0")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert onnx_embedder.cpu_only("auto") and onnx_embedder.cpu_only(None)


def test_cxr_query_answers_without_torch_as_the_torch_path_does(tiny, monkeypatch, capsys):
    root, df, _ = tiny
    args = ["query", str(root / df["image_path"][3]), "--index", str(root / "idx"), "-k", "4", "--json"]
    monkeypatch.setenv("CXR_IMAGE_RUNTIME", "torch")
    assert main([*args, "--device", "cpu"]) == 0
    want = json.loads(capsys.readouterr().out)
    code = (
        "import json, sys\nfrom cli.main import main\nmain(sys.argv[1:])\n"
        "print(json.dumps(sorted(m for m in ('torch', 'open_clip', 'timm') if m in sys.modules)), file=sys.stderr)"
    )
    env = {**os.environ, "CXR_IMAGE_RUNTIME": "auto", "PYTHONPATH": str(REPO)}
    proc = run_python(code, *args, env=env, timeout=120)
    assert json.loads(proc.stderr.strip().splitlines()[-1]) == []  # neither torch nor open_clip was imported
    got = json.loads(proc.stdout)
    assert [r["row_id"] for r in got["results"]] == [r["row_id"] for r in want["results"]]
    np.testing.assert_allclose([r["score"] for r in got["results"]], [r["score"] for r in want["results"]], atol=1e-4)


def test_the_table_fits_80_columns_and_wide_shows_the_whole_report(tiny, monkeypatch, capsys):
    root, df, _ = tiny
    monkeypatch.setenv("COLUMNS", "80")
    args = ["query", str(root / df["image_path"][0]), "--index", str(root / "idx"), "-k", "12", "--target", "images"]
    args.append("--all-per-patient")  # every image, not each patient's best only
    assert main(args) == 0
    lines = capsys.readouterr().out.splitlines()
    hits = [line for line in lines if line.strip()[:2].strip().isdigit()]
    assert len(hits) == 12 and max(len(line) for line in lines) <= 80  # one line per hit
    long = df["report"][0]
    assert not any(long[:150] in line for line in lines)
    assert main([*args, "--wide"]) == 0
    wide = " ".join(" ".join(capsys.readouterr().out.split()).split(" │ "))
    assert "well above the normal range today. The heart" in wide
