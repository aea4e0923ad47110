"""The CUDA paths against the CPU, where torch sees a GPU: encode (fp32 and bf16 autocast), the torch search
backend against faiss-cpu's top-k, a VLM generating on CUDA, and `cxr serve` answering on CUDA.

Every test carries the `gpu` marker; on a machine without CUDA, conftest skips them and says why.
`benchmarks/gpu_check.sh` runs them (with the GPU rows of the speed tables) on a lent GPU.
"""

from __future__ import annotations

import faiss
import numpy as np
import pytest
import torch
from gen_synth import make_manifest, tiny_vlm_config

from retrieval.data.image_io import read_image

pytestmark = pytest.mark.gpu

# cos(CPU fp32, CUDA) of the same embedding at least: fp32 on CUDA uses TF32 in cuDNN convolutions; bf16 keeps 8 bits
MIN_COS = {"fp32": 0.999, "bf16": 0.99}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("cuda")
    return root, make_manifest(root, n=36)


@pytest.fixture(scope="module")
def small():
    from retrieval.models import load_model

    return load_model("cxr-small", device="cpu")


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_encode_on_cuda_equals_the_cpu_encode(small, corpus, precision):
    root, df = corpus
    images = [read_image(root / p) for p in df["image_path"][:12]]
    texts = list(df["report"][:12])
    ref_img = small.encode_images(images, device="cpu", precision="fp32")
    ref_txt = small.encode_texts(texts, device="cpu", precision="fp32")
    try:
        img = small.encode_images(images, device="cuda", precision=precision, batch_size=5)
        txt = small.encode_texts(texts, device="cuda", precision=precision)
        assert next(small.parameters()).device.type == "cuda"
    finally:
        small.to("cpu")
    for ref, got in ((ref_img, img), (ref_txt, txt)):
        assert got.dtype == np.float32 and got.flags.c_contiguous and got.shape == ref.shape
        np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-3)
        assert (ref * got).sum(axis=1).min() >= MIN_COS[precision]


def test_auto_precision_on_cuda_is_bf16(small, corpus):
    from retrieval.device import resolve_precision

    root, df = corpus
    images = [read_image(root / p) for p in df["image_path"][:4]]
    assert resolve_precision("auto", torch.device("cuda")) == "bf16"
    try:
        auto = small.encode_images(images, device="cuda")
        bf16 = small.encode_images(images, device="cuda", precision="bf16")
    finally:
        small.to("cpu")
    np.testing.assert_allclose(auto, bf16, atol=1e-4)  # the same bf16 pass (cuDNN may pick other kernels)


def _unit(n: int, d: int, seed: int) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_cuda_search_backend_returns_faiss_cpu_top_k(precision):
    from index.backends import TorchBackend, make_backend

    base, queries = _unit(20_000, 256, 0), _unit(200, 256, 1)
    flat = faiss.IndexFlatIP(256)
    flat.add(base)
    want_scores, want_ids = flat.search(queries, 10)
    scores, ids = TorchBackend(base, "cuda", precision).search(queries, 10)
    assert ids.shape == want_ids.shape and ids.dtype == np.int64
    recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(ids, want_ids, strict=True)])
    if precision == "fp32":
        assert recall >= 0.999
        np.testing.assert_allclose(scores, want_scores, atol=1e-4)
        assert make_backend(flat, "auto", "cuda").name == ("faiss-gpu" if faiss.get_num_gpus() else "torch")
    else:
        assert recall >= 0.9
        np.testing.assert_allclose(scores, want_scores, atol=2e-2)
    # more rows asked for than the index holds: padded as faiss pads
    s, i = TorchBackend(base[:5], "cuda", precision).search(queries[:2], 8)
    assert (i[:, 5:] == -1).all() and np.isneginf(s[:, 5:]).all()


@pytest.fixture(scope="module")
def vlm(corpus):
    from generation.model.language_model import DEFAULT_LM
    from generation.training.train import train_vlm

    root, df = corpus
    cfg = tiny_vlm_config(60, lm_path=DEFAULT_LM, rag_k=0)  # the config's default LM, SmolLM2 (lm_overrides unused)
    train_vlm(df, root / "vlm", cfg, progress=False)
    return root / "vlm"


def test_vlm_generates_on_cuda_as_on_the_cpu(vlm, corpus):
    from generation.writing.generate import Generator
    from generation.writing.generator_options import GeneratorOptions

    root, df = corpus
    images = [read_image(root / p) for p in df["image_path"][:3]]
    tasks = ["report", "ground", "identify", "vqa"]
    prompts = ["describe the findings and impression.", "right lung", "describe the findings with their boxes.",
               "is there cardiomegaly?"]  # fmt: skip
    out = {}
    for device in ("cpu", "cuda"):
        gen = Generator(vlm, device=device)
        assert next(gen.vlm.parameters()).device.type == device
        vis = gen.visual([images[0]] * len(tasks))  # pooled tokens come back on the CPU; generate moves them
        probs, _ = gen.finding_probs(vis[:1])
        out[device] = (probs, gen.generate(vis, tasks, prompts, [[]] * len(tasks)))
        by_lm = GeneratorOptions(box_source="lm", vqa_source="lm", report_source="generate")
        lm = Generator(vlm, device=device, options=by_lm)
        drafts = lm.generate(lm.visual(images[:1] * 2), ["report", "ground"], prompts[:2], [[], []])
        assert all(isinstance(d["text"], str) for d in drafts) and drafts[0]["source"] == "lm"
    (p_cpu, cpu), (p_cuda, cuda) = out["cpu"], out["cuda"]
    np.testing.assert_allclose(p_cuda, p_cpu, atol=0.05)
    for a, b in zip(cpu, cuda, strict=True):
        assert a["task"] == b["task"] and a["source"] == b["source"]
        assert len(a.get("boxes") or []) == len(b.get("boxes") or [])
        for ba, bb in zip(a.get("boxes") or [], b.get("boxes") or [], strict=True):
            assert max(abs(ba[c] - bb[c]) for c in ("x1", "y1", "x2", "y2")) <= 0.05
    assert cuda[0]["text"] and cuda[3]["text"] in ("yes", "no")


def test_serve_on_cuda_answers_as_on_the_cpu(vlm, corpus):
    pytest.importorskip("fastapi", reason="the serve extra is not installed: pip install -e '.[serve]'")
    from fastapi.testclient import TestClient

    from index.build import BuildOptions, build_index
    from retrieval.models import load_model
    from serve.app import create_app
    from serve.service import ServeService
    from serve.settings import ServeConfig

    root, df = corpus
    build_index(df, load_model("cxr-tiny", device="cpu"), root / "idx", options=BuildOptions(workers=0, progress=False))
    png = (root / df["image_path"][4]).read_bytes()
    scores, texts = {}, {}
    for device in ("cpu", "cuda"):
        svc = ServeService(ServeConfig(index=root / "idx", model="cxr-tiny", vlm=vlm, device=device, workers=2,
                                       watch_interval=0))  # fmt: skip
        try:
            assert next(svc.model.parameters()).device.type == device
            with TestClient(create_app(svc)) as client:
                r = client.post("/search", files={"image": ("4.png", png, "image/png")},
                                data={"k": str(len(df)), "target": "images"})  # fmt: skip
                assert r.status_code == 200, r.text
                scores[device] = {h["image_id"]: h["score"] for h in r.json()["results"]}
                g = client.post("/generate", files={"image": ("4.png", png, "image/png")}, data={"task": "report"})
                assert g.status_code == 200, g.text
                texts[device] = g.json()["text"]
                backend = client.get("/info").json()["index"]["backends"]["images"]
                assert backend == ("faiss-cpu" if device == "cpu" else ("faiss-gpu", "torch")[not faiss.get_num_gpus()])
        finally:
            svc.close()
    assert scores["cuda"].keys() == scores["cpu"].keys() and len(scores["cpu"]) == len(df)
    assert max(abs(scores["cuda"][k] - scores["cpu"][k]) for k in scores["cpu"]) <= 0.02
    assert texts["cuda"]
