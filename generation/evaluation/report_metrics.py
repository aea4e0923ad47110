"""The field's report metrics, optional: CheXbert-label F1 and RadGraph F1 (`pip install 'cxr-retrieval[metrics]'`).

Weights come from `cxr models prefetch chexbert|radgraph --to DIR/NAME` (then `--metrics-dir DIR`), from
`CXR_CHEXBERT_DIR` / `CXR_RADGRAPH_DIR`, or from the libraries' own cache folders. A missing library or weight file
is a `MetricUnavailable` whose one line names the command that fetches it; nothing falls back silently.

**CheXbert-label F1.** The labeler is f1chexbert's own `bert_labeler` (BERT-base + 14 linear heads) filled from
`chexbert.pth`, every weight checked. f1chexbert 0.0.2's scoring path does not run on today's libraries, so the few
lines around the model are ours (same semantics, tested against the library's own `F1CheXbert` on a tiny labeler):
  - `tokenize()` calls `tokenizer.encode_plus(tokens)`, which transformers 5 removed: ids here are
    `[CLS] + convert_tokens_to_ids(tokens) + [SEP]`, cut to 512 as it does;
  - `forward()` unpacks scikit-learn's private `_check_targets` into 3 values; scikit-learn 1.9 returns 5
    (y_type, labels, y_true, y_pred, sample_weight): ValueError. It only feeds a per-report accuracy that the
    metric does not report, so scores come from scikit-learn's public `classification_report` / `accuracy_score`;
  - `download_model()` passes `force_filename` to `hf_hub_download`, gone from huggingface_hub (>= 1.0), and
    only prints the error: weights are fetched by `cxr models prefetch chexbert` instead;
  - it loads the checkpoint with `strict=False` (a wrong file gives a random labeler): here every weight must be
    filled and nothing but `position_ids` may be left over.
Labels follow f1chexbert's "rrg" mode: a finding is positive when the head says present or uncertain. Reported:
micro and macro F1 over the 14 CheXpert labels (`chexbert_micro_f1_14`, `chexbert_macro_f1_14`, "No Finding"
included) and over the 5 (Cardiomegaly, Edema, Consolidation, Atelectasis, Pleural Effusion: `..._5`), and the
exact-match accuracy over the 5 (`chexbert_accuracy_5`), i.e. f1chexbert's `accuracy, _, cr, cr_5`.

**RadGraph F1.** The `radgraph` package's own `F1RadGraph` (RadGraph-XL) with `reward_level="all"`: entity F1
(`radgraph_simple`), entity + relation partial (`radgraph_partial`) and complete (`radgraph_complete`) rewards,
averaged over reports.
"""

from __future__ import annotations

import contextlib
import contextvars
import io
import os
import re
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np

from retrieval.errors import CXRError
from retrieval.labels import LABELS, NO_FINDING

EXTRA_HINT = "pip install 'cxr-retrieval[metrics]'"
# f1chexbert's target_names, the order of its 14 heads: the CheXpert findings in the project's order, then No Finding
CHEXPERT_14 = [*(x for x in LABELS if x not in (NO_FINDING, "Tuberculosis")), NO_FINDING]
CHEXPERT_5 = ["Cardiomegaly", "Edema", "Consolidation", "Atelectasis", "Pleural Effusion"]
MAX_TOKENS = 512  # BERT's positions; f1chexbert keeps the first 511 ids and [SEP]


class MetricUnavailable(CXRError):
    """A requested report metric cannot run here (library or weights missing); the message says how to fix it."""


def _weights_dir(name: str, metrics_dir: str | Path | None, default: str) -> Path:
    """METRICS_DIR/NAME (a `cxr models prefetch NAME --to` folder), else $CXR_<NAME>_DIR, else the library's cache."""
    if metrics_dir is not None:
        return Path(metrics_dir) / name
    return Path(os.environ.get(f"CXR_{name.upper()}_DIR", default))


def weights_status(name: str) -> tuple[bool, str]:
    """(usable offline now, why) of metric `name` with no --metrics-dir, for `cxr models list`: its library is
    installed and its weight file is in $CXR_<NAME>_DIR or the library's cache. Imports neither library."""
    import importlib.metadata
    import importlib.util

    from retrieval.models.bundle import CHEXBERT_FILE, RADGRAPH_MODEL

    package = {"chexbert": "f1chexbert", "radgraph": "radgraph"}[name]
    if importlib.util.find_spec(package) is None or importlib.util.find_spec("appdirs") is None:
        return False, f"{package} not installed: {EXTRA_HINT}"
    from appdirs import user_cache_dir

    cache = user_cache_dir(name)
    if name == "radgraph":
        cache = os.path.join(cache, importlib.metadata.version("radgraph"))  # radgraph's own versioned cache
    folder = _weights_dir(name, None, cache)
    weights = folder / (CHEXBERT_FILE if name == "chexbert" else f"{RADGRAPH_MODEL}/weights.th")
    if weights.is_file():
        return True, f"weights at {folder}"
    return False, f"no weights at {folder}: cxr models prefetch {name} --to DIR/{name}, then --metrics-dir DIR"


def _missing(name: str, what: Path) -> MetricUnavailable:
    return MetricUnavailable(
        f"{name}: weights not found at {what}; fetch them with `cxr models prefetch {name} --to DIR/{name}` "
        f"(on a connected machine) and pass --metrics-dir DIR"
    )


def _import_error(name: str, package: str, e: ImportError) -> MetricUnavailable:
    if e.name == package:
        return MetricUnavailable(f"{name}: the {package} package is not installed ({EXTRA_HINT})")
    return MetricUnavailable(f"{name}: {package} does not import here ({type(e).__name__}: {e})")


# ---- CheXbert ----------------------------------------------------------------------------------------------
class CheXbertLabeler:
    """f1chexbert's labeler, loaded from a prefetched folder, giving 0/1 labels over CHEXPERT_14 per report."""

    def __init__(self, folder: Path):
        from retrieval.models.bundle import CHEXBERT_BERT, CHEXBERT_FILE

        try:
            import torch
            from transformers import AutoConfig, BertTokenizer

            with warnings.catch_warnings():  # its import switches every warning off, process-wide: undone here
                from f1chexbert import f1chexbert as lib
        except ImportError as e:
            raise _import_error("chexbert", "f1chexbert", e) from None
        ckpt = folder / CHEXBERT_FILE
        if not ckpt.is_file():
            raise _missing("chexbert", ckpt)
        local = folder / CHEXBERT_BERT
        source = str(local) if (local / "config.json").is_file() else CHEXBERT_BERT  # else the HF cache
        try:
            config = AutoConfig.from_pretrained(source)
            self.tokenizer = BertTokenizer.from_pretrained(source)
        except OSError as e:  # neither prefetched nor in the HF cache
            raise MetricUnavailable(
                f"chexbert: no {CHEXBERT_BERT} config/tokenizer at {local} or in the HF cache "
                f"({str(e).splitlines()[0][:160]}); run `cxr models prefetch chexbert --to DIR/chexbert` "
                "and pass --metrics-dir DIR"
            ) from None
        saved = lib.AutoConfig
        lib.AutoConfig = SimpleNamespace(from_pretrained=lambda *a, **k: config)  # it asks the hub by name
        try:
            model = lib.bert_labeler(inference=True)
        finally:
            lib.AutoConfig = saved
        try:
            state = torch.load(ckpt, map_location="cpu", weights_only=True)["model_state_dict"]
        except Exception as e:  # noqa: BLE001 - truncated file, pickle refused, wrong layout: one line
            raise MetricUnavailable(
                f"{ckpt}: not a CheXbert checkpoint ({type(e).__name__}: {str(e).splitlines()[0][:160]}); "
                "re-fetch it with `cxr models prefetch chexbert --to DIR/chexbert`"
            ) from None
        state = {k.removeprefix("module."): v for k, v in state.items()}
        wanted = model.state_dict()
        unfilled = [k for k in wanted if k not in state]
        extra = [k for k in state if k not in wanted and not k.endswith("position_ids")]
        if unfilled or extra:
            raise MetricUnavailable(
                f"{ckpt}: does not fit the CheXbert labeler ({len(unfilled)} weights unfilled, {len(extra)} left "
                f"over, e.g. {(unfilled or extra)[0]}); re-fetch it with `cxr models prefetch chexbert --to "
                "DIR/chexbert`"
            )
        try:
            model.load_state_dict({k: state[k] for k in wanted})
        except RuntimeError as e:  # shapes: a checkpoint of another architecture
            raise MetricUnavailable(
                f"{ckpt}: does not fit the CheXbert labeler ({str(e).splitlines()[-1].strip()[:160]}); re-fetch it "
                "with `cxr models prefetch chexbert --to DIR/chexbert`"
            ) from None
        self.model = model.eval()
        self._torch = torch
        self._cache: dict[str, np.ndarray] = {}

    def token_ids(self, text: str) -> list[int]:
        """f1chexbert's `tokenize` for one report (whitespace collapsed; empty -> [CLS][SEP]; at most 512 ids)."""
        tok = self.tokenizer
        tokens = tok.tokenize(re.sub(r"\s+", " ", str(text).strip().replace("\n", " ")).strip())
        ids = [tok.cls_token_id, *tok.convert_tokens_to_ids(tokens), tok.sep_token_id]
        return ids[: MAX_TOKENS - 1] + [tok.sep_token_id] if len(ids) > MAX_TOKENS else ids

    def labels(self, texts: Sequence[str], batch_size: int = 16) -> np.ndarray:
        """(n, 14) 0/1 array: head argmax in {present, uncertain} (f1chexbert's "rrg" mode). Each distinct text is
        labelled once per process (an evaluation scores the same references in every row)."""
        todo = sorted({str(t).strip() for t in texts} - self._cache.keys(), key=len)
        torch = self._torch
        for start in range(0, len(todo), batch_size):
            chunk = todo[start : start + batch_size]
            ids = [self.token_ids(t) for t in chunk]
            width = max(map(len, ids))
            batch = torch.full((len(ids), width), self.tokenizer.pad_token_id or 0, dtype=torch.long)
            mask = torch.zeros((len(ids), width), dtype=torch.float)
            for row, seq in enumerate(ids):
                batch[row, : len(seq)] = torch.tensor(seq)
                mask[row, : len(seq)] = 1
            with torch.inference_mode():
                heads = self.model(batch, mask)
            cls = torch.stack([h.argmax(dim=1) for h in heads], dim=1).numpy()
            for text, row in zip(chunk, cls, strict=True):
                self._cache[text] = np.isin(row, (1, 3)).astype(int)  # 1 present, 3 uncertain (the last head: 1 yes)
        return np.stack([self._cache[str(t).strip()] for t in texts]) if texts else np.zeros((0, 14), int)


def _check_pairs(references: Sequence[str], hypotheses: Sequence[str]) -> None:
    if len(references) != len(hypotheses) or not references:
        raise ValueError("need as many hypotheses as references, and at least one")


def _library_weights(name: str, package: str, metrics_dir: str | Path | None, library_cache: Any) -> Path:
    """The weights folder of metric `name` (`_weights_dir`); `library_cache()` imports the metric's library and
    gives its own cache folder, and an ImportError there is the one-line MetricUnavailable naming `package`."""
    try:
        default = library_cache()
    except ImportError as e:
        raise _import_error(name, package, e) from None
    return _weights_dir(name, metrics_dir, default)


def _chexbert_cache() -> str:
    from appdirs import user_cache_dir  # f1chexbert's own cache location (and one of its dependencies)

    return user_cache_dir("chexbert")


def _radgraph_cache() -> str:
    import radgraph
    from radgraph import F1RadGraph  # noqa: F401 (the scorer radgraph_f1 loads: importable, or MetricUnavailable)

    return radgraph.radgraph.CACHE_DIR  # the library's versioned cache


_SCORERS: dict[tuple[str, str], Any] = {}  # (metric, weights folder) -> loaded scorer, once per process


def chexbert_f1(
    references: Sequence[str], hypotheses: Sequence[str], metrics_dir: str | Path | None = None
) -> dict[str, float]:
    """CheXbert-label F1: micro/macro over the 14 CheXpert labels and over the 5, plus exact-match accuracy over 5."""
    from sklearn.metrics import accuracy_score, classification_report

    _check_pairs(references, hypotheses)
    folder = _library_weights("chexbert", "f1chexbert", metrics_dir, _chexbert_cache)
    key = ("chexbert", str(folder))
    if key not in _SCORERS:
        _SCORERS[key] = CheXbertLabeler(folder)
    labeler = _SCORERS[key]
    ref, hyp = labeler.labels(references), labeler.labels(hypotheses)
    five = [CHEXPERT_14.index(n) for n in CHEXPERT_5]
    out = {"chexbert_accuracy_5": float(accuracy_score(ref[:, five], hyp[:, five]))}
    for tag, cols, names in (("14", slice(None), CHEXPERT_14), ("5", five, CHEXPERT_5)):
        cr = classification_report(ref[:, cols], hyp[:, cols], target_names=names, output_dict=True, zero_division=0)
        for avg in ("micro", "macro"):
            out[f"chexbert_{avg}_f1_{tag}"] = float(cr[f"{avg} avg"]["f1-score"])
    return out


# ---- RadGraph ----------------------------------------------------------------------------------------------
def _has(obj: Any, name: str) -> bool:
    try:
        getattr(obj, name)
    except AttributeError:  # transformers 5 tokenizers raise it from __getattr__
        return False
    return True


def _bridge_tokenizer(tok: Any) -> Any:
    """Give one tokenizer the two methods radgraph's vendored AllenNLP calls and transformers 5 removed:
    `encode_plus(...)` is `tok(...)` (same arguments), `build_inputs_with_special_tokens(a, b=None)` is BERT's
    `[CLS] a [SEP] (b [SEP])`. A no-op where they exist (transformers 4)."""
    if not _has(tok, "encode_plus"):
        object.__setattr__(tok, "encode_plus", lambda *a, **k: tok(*a, **k))
    if not _has(tok, "build_inputs_with_special_tokens"):
        cls, sep = tok.cls_token_id, tok.sep_token_id
        if cls is None or sep is None:
            raise MetricUnavailable(f"radgraph: tokenizer {type(tok).__name__} has no [CLS]/[SEP] (not a BERT)")
        object.__setattr__(
            tok, "build_inputs_with_special_tokens", lambda a, b=None: [cls, *a, sep] + ([*b, sep] if b else [])
        )
    return tok


@contextlib.contextmanager
def radgraph_compat(local_bert: Path | None = None) -> Iterator[None]:
    """While radgraph builds its model: every tokenizer it makes is bridged (they all come from one function of
    its vendored AllenNLP, `cached_transformers.get_tokenizer`; the bridged instances keep working afterwards),
    and, when `local_bert` holds a config.json, the BERT its config.json names by hub id is read from there
    (its weights are in weights.th: only the config and tokenizer are needed), so the archive stays as shipped."""
    from radgraph.allennlp.common import cached_transformers as ct

    def local(name: str) -> str:
        use = local_bert is not None and (local_bert / "config.json").is_file() and not Path(name).is_dir()
        return str(local_bert) if use else name

    get, get_tokenizer = ct.get, ct.get_tokenizer
    ct.get = lambda name, *a, **k: get(local(name), *a, **k)
    ct.get_tokenizer = lambda name, *a, **k: _bridge_tokenizer(get_tokenizer(local(name), *a, **k))
    try:
        yield
    finally:
        ct.get, ct.get_tokenizer = get, get_tokenizer


def radgraph_f1(
    references: Sequence[str], hypotheses: Sequence[str], metrics_dir: str | Path | None = None
) -> dict[str, float]:
    """RadGraph F1 (radgraph's F1RadGraph, RadGraph-XL): simple, partial and complete rewards, mean over reports."""
    from retrieval.models.bundle import RADGRAPH_BERT_DIR, RADGRAPH_MODEL

    _check_pairs(references, hypotheses)
    folder = _library_weights("radgraph", "radgraph", metrics_dir, _radgraph_cache)
    if not (folder / RADGRAPH_MODEL / "weights.th").is_file():
        raise _missing("radgraph", folder / RADGRAPH_MODEL / "weights.th")
    key = ("radgraph", str(folder))
    with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():  # it prints its device
        warnings.simplefilter("ignore")
        if key not in _SCORERS:
            try:
                from radgraph import F1RadGraph

                with radgraph_compat(folder / RADGRAPH_BERT_DIR):
                    _SCORERS[key] = F1RadGraph(
                        reward_level="all", model_type=RADGRAPH_MODEL, model_cache_dir=str(folder), cuda=-1
                    )
            except OSError as e:  # transformers: the BERT's config/tokenizer neither local nor cached
                raise MetricUnavailable(
                    f"radgraph: cannot load its BERT config/tokenizer ({str(e).splitlines()[0][:160]}); run "
                    "`cxr models prefetch radgraph --to DIR/radgraph` and pass --metrics-dir DIR"
                ) from None
        mean, *_ = _SCORERS[key](refs=list(references), hyps=list(hypotheses))
    simple, partial, complete = (float(x) for x in mean)
    return {"radgraph_simple": simple, "radgraph_partial": partial, "radgraph_complete": complete}


# ---- selection -----------------------------------------------------------------------------------------------
REPORT_METRICS = {"chexbert": chexbert_f1, "radgraph": radgraph_f1}
_ACTIVE: contextvars.ContextVar[tuple[tuple[str, ...], Path | None]] = contextvars.ContextVar(
    "report_metrics", default=((), None)
)


def parse_metrics(spec: str | None) -> tuple[str, ...]:
    """`--metrics default,chexbert,radgraph` -> the optional ones requested (default = BLEU/ROUGE/METEOR/CIDEr +
    labeler F1, always computed). Unknown names are a MetricUnavailable listing the known ones."""
    names = [n.strip().lower() for n in (spec or "default").split(",") if n.strip()]
    bad = [n for n in names if n not in ("default", *REPORT_METRICS)]
    if bad:
        raise MetricUnavailable(f"unknown metric {bad[0]!r}; known: default, {', '.join(REPORT_METRICS)}")
    return tuple(n for n in dict.fromkeys(names) if n != "default")


def check_report_metrics(names: Sequence[str], metrics_dir: str | Path | None = None) -> None:
    """Fail before a long evaluation when a requested metric cannot run (one line naming the fix)."""
    for name in names:
        REPORT_METRICS[name](["No acute cardiopulmonary process."], ["No acute cardiopulmonary process."], metrics_dir)


@contextlib.contextmanager
def use_report_metrics(names: Sequence[str], metrics_dir: str | Path | None = None) -> Iterator[None]:
    """Within the block, every `metrics.text_metrics` call (so each report row of an evaluation) adds these."""
    token = _ACTIVE.set((tuple(names), Path(metrics_dir) if metrics_dir else None))
    try:
        yield
    finally:
        _ACTIVE.reset(token)


def active_scores(references: Sequence[str], hypotheses: Sequence[str]) -> dict[str, float]:
    """The report metrics switched on by the enclosing `use_report_metrics` ({} outside one)."""
    names, folder = _ACTIVE.get()
    out: dict[str, float] = {}
    for name in names:
        out |= REPORT_METRICS[name](references, hypotheses, folder)
    return out
