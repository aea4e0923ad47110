"""Constrained box decoding: transformers' `prefix_allowed_tokens_fn` keeps every generated box well formed.

A box is `{ <x1> <y1> <x2> <y2> }` on the 0-100 grid (`boxes.py`). Unconstrained, a small decoder emits three
coordinates, a `}` too early or x2 <= x1 (the malformed boxes `boxes.malformed_boxes` counts). The grammar below
is a four-state machine over the tokens generated so far:

- *text* (before anything, after `;`): any token but a coordinate or `}` (a label's words, `{`, the end);
- *inside a box* after `{` and n < 4 coordinates: only coordinates, and the second pair must exceed the first
  (x2 > x1, y2 > y1), so the box is valid by construction;
- *box full*: only `}`;
- *after a box*: `;` (another finding) or the end; with `boxes_only` (grounding, "where is"), `{` or the end.

`boxes_only` tasks also start inside the grammar (their first token must be `{`). Decoding stays greedy or beam
search as configured; only the choice of token is restricted. `generate`'s input ids are the generated tokens
only (the prompt enters as embeddings), so the grammar reads exactly what was generated.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from generation.data.boxes import COORD_MAX
from generation.model.tokenizer import COORD_TOKENS, end_id


class BoxGrammar:
    """The allowed next tokens for a generated prefix (token ids, prompt excluded)."""

    def __init__(self, tok, boxes_only: bool):
        self.boxes_only = boxes_only
        self.coord_ids = [tok.convert_tokens_to_ids(t) for t in COORD_TOKENS]
        self.coord_of = {tid: i for i, tid in enumerate(self.coord_ids)}
        self.open, self.close = tok.convert_tokens_to_ids("{"), tok.convert_tokens_to_ids("}")
        self.sep = tok.convert_tokens_to_ids(";")
        self.end = end_id(tok)
        frame = {tok.pad_token_id, tok.cls_token_id, tok.bos_token_id} - {None, self.end}  # pad may be the LM's eos
        banned = set(self.coord_ids) | {self.close} | frame
        # word pieces that spell a brace (`{`, `##}`) would open or close a box the parser sees but the grammar
        # does not: only the brace tokens themselves may
        pieces = tok.convert_ids_to_tokens(list(range(len(tok))))
        banned |= {i for i, p in enumerate(pieces) if ("{" in p or "}" in p) and i != self.open}
        self.text_ids = [i for i in range(len(tok)) if i not in banned]

    def allowed(self, prefix: Sequence[int]) -> list[int]:
        """Token ids allowed after `prefix`."""
        coords: list[int] | None = None  # None: outside a box
        closed = False  # the last thing was a closed box
        for t in prefix:
            if t == self.open:
                coords, closed = [], False
            elif coords is not None and t in self.coord_of:
                coords.append(self.coord_of[t])
            elif coords is not None and t == self.close:
                coords, closed = None, True
            elif t == self.end:
                return [self.end]
            else:
                closed = False
        if coords is None:
            if closed:
                return [self.open, self.end] if self.boxes_only else [self.sep, self.end]
            return [self.open] if self.boxes_only and not prefix else self.text_ids
        if len(coords) == 4:
            return [self.close]
        if len(coords) < 2:
            return self.coord_ids[:COORD_MAX]  # x1, y1 < 100: room for the second corner
        return self.coord_ids[coords[len(coords) - 2] + 1 :]  # x2 > x1, y2 > y1


def grammar_for(task: str, prompt: str) -> bool | None:
    """Which grammar a (task, prompt) decodes under: True = boxes only, False = labelled boxes, None = free."""
    if task == "ground" or (task == "vqa" and prompt.startswith("where is")):
        return True
    if task == "identify":
        return False
    return None


def box_decoding(tok, task: str, prompts: Sequence[str]) -> dict:
    """`generate` keyword arguments that constrain the boxes of a batch of `task` prompts (row by row); empty when
    no row has boxes to generate."""
    kinds = [grammar_for(task, p) for p in prompts]
    if all(k is None for k in kinds):
        return {}
    grammars = {k: BoxGrammar(tok, boxes_only=k) for k in set(kinds) if k is not None}
    everything = list(range(len(tok)))

    def fn(batch_id: int, input_ids: torch.Tensor) -> list[int]:
        kind = kinds[batch_id]
        return everything if kind is None else grammars[kind].allowed(input_ids.tolist())

    return {"prefix_allowed_tokens_fn": fn}
