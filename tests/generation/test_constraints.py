"""Constrained box decoding (the grammar behind `prefix_allowed_tokens_fn`) and the finding head's answers."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gen_synth import UNIT_LM, one_thread  # noqa: F401 (an autouse fixture)

from generation.data.boxes import malformed_boxes, parse_boxes
from generation.data.rag import Exemplar
from generation.heads.head import closed_answer, closed_finding, fit_thresholds, rank_exemplars
from generation.model.tokenizer import build_tokenizer, decode
from generation.model.vlm import VLM
from generation.writing.constraints import BoxGrammar, box_decoding
from retrieval.labels import LABELS


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer(corpus=["cardiomegaly", "right lung"])


def _walk(tok, grammar, rng, steps=40):
    """A random walk through the grammar: every step picks one of the allowed tokens."""
    out: list[int] = []
    for _ in range(steps):
        allowed = grammar.allowed(out)
        out.append(int(rng.choice(allowed)))
        if out[-1] == tok.sep_token_id:
            break
    return out


@pytest.mark.parametrize("boxes_only", [True, False])
def test_every_path_through_the_grammar_gives_valid_boxes(tok, boxes_only):
    grammar = BoxGrammar(tok, boxes_only)
    rng = np.random.default_rng(0)
    for _ in range(200):
        ids = _walk(tok, grammar, rng)
        text = decode(tok, [i for i in ids if i != tok.sep_token_id])
        attempts, bad = malformed_boxes(text)
        complete = ids[-1] == tok.sep_token_id  # a walk cut by the step limit may end inside a box
        if complete:
            assert bad == 0, text
            assert len(parse_boxes(text)) == attempts
        if boxes_only:
            assert ids[0] == tok.convert_tokens_to_ids("{")


def test_grammar_orders_the_corners(tok):
    g = BoxGrammar(tok, boxes_only=True)
    c = [tok.convert_tokens_to_ids(f"<{i}>") for i in (30, 40)]
    open_ = tok.convert_tokens_to_ids("{")
    allowed = g.allowed([open_, *c])  # x1=30, y1=40: x2 must exceed 30
    assert tok.convert_tokens_to_ids("<30>") not in allowed and tok.convert_tokens_to_ids("<31>") in allowed
    assert tok.convert_tokens_to_ids("<100>") not in g.allowed([open_])  # no room for x2 > 100
    full = g.allowed([open_, *c, tok.convert_tokens_to_ids("<31>"), tok.convert_tokens_to_ids("<90>")])
    assert full == [tok.convert_tokens_to_ids("}")]


def test_constrained_generation_of_an_untrained_vlm_never_emits_a_malformed_box(tok):
    torch.manual_seed(0)
    vlm = VLM.create(
        12,
        [{"spec": "t"}],
        lm_overrides=UNIT_LM,
        corpus=["cardiomegaly", "right lung"],
    ).eval()
    t = vlm.tok
    prompts = [[t.cls_token_id, t.convert_tokens_to_ids("[ground]"), t.sep_token_id]] * 4
    visual = torch.randn(4, 10, 12)
    free = [decode(t, g) for g in vlm.generate(visual, prompts, max_new_tokens=20)]
    assert sum(malformed_boxes(x)[1] for x in free) + sum(not malformed_boxes(x)[0] for x in free) > 0
    ruled = vlm.generate(visual, prompts, max_new_tokens=20, **box_decoding(t, "ground", ["right lung"] * 4))
    for g in ruled:
        text = decode(t, g)
        attempts, bad = malformed_boxes(text)
        if g and len(g) < 20:  # finished inside the token limit
            assert attempts >= 1 and bad == 0, text
    assert box_decoding(t, "report", ["describe."]) == {}


def test_fit_thresholds_match_prevalence():
    rng = np.random.default_rng(0)
    probs = rng.random((200, 3))
    targets = np.zeros((200, 3))
    targets[:20, 0] = 1  # 10 % positive
    targets[:100, 1] = 1  # 50 %
    th = fit_thresholds(probs, targets)
    assert (probs[:, 0] > th[0]).sum() == 20 and (probs[:, 1] > th[1]).sum() == 100
    assert th[2] == 0.5  # no positives: the default


def test_closed_answers_and_exemplar_ranking_follow_the_head():
    j = LABELS.index("Cardiomegaly")
    assert closed_finding("is there cardiomegaly?") == j
    assert closed_finding("where is the heart?") is None and closed_finding("is there a dragon?") is None
    probs = np.full(len(LABELS), 0.05)
    probs[j] = 0.9
    th = [0.5] * len(LABELS)
    assert closed_answer("is there cardiomegaly?", probs, th) == "yes"
    assert closed_answer("is there pleural effusion?", probs, th) == "no"
    assert closed_answer("what abnormality is seen?", probs, th) is None
    exs = [
        Exemplar("a", "p1", 0.9, "the lungs are clear. there is a large right pleural effusion."),
        Exemplar("b", "p2", 0.8, "the heart is enlarged, consistent with cardiomegaly."),
    ]
    assert [e.study_id for e in rank_exemplars(exs, probs)] == ["b", "a"]
