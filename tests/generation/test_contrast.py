"""Context-contrastive decoding (generation/model/contrast.py) against a naive reference: each row's contrast
prompt run alone, unpadded, through the LM."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from tiny_lm import save_tiny_lm
from transformers import AutoModelForCausalLM, AutoTokenizer

from generation.model.contrast import ContrastLogitsProcessor


@pytest.fixture(scope="module")
def lm_and_tok(tmp_path_factory):
    folder = save_tiny_lm(tmp_path_factory.mktemp("contrast_lm"))
    return AutoModelForCausalLM.from_pretrained(str(folder)).eval(), AutoTokenizer.from_pretrained(str(folder))


def _naive(lm, prompt: list[int], generated: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return F.log_softmax(lm(input_ids=torch.tensor([prompt + generated])).logits[0, -1].float(), dim=-1)


@pytest.mark.parametrize("alpha", [0.0, 1.5])
@pytest.mark.parametrize("num_beams", [1, 2])
def test_contrast_scores_match_each_row_run_alone(lm_and_tok, alpha, num_beams):
    lm, tok = lm_and_tok
    prompts = [tok("the heart is normal in size.")["input_ids"], tok("right pleural effusion.")["input_ids"]]
    assert len(prompts[0]) != len(prompts[1])  # so one row is left-padded
    rows = len(prompts) * num_beams
    generated = torch.randint(3, len(tok), (rows, 3), generator=torch.Generator().manual_seed(0))
    scores = torch.randn(rows, lm.config.vocab_size, generator=torch.Generator().manual_seed(1))
    proc = ContrastLogitsProcessor(lm, prompts, tok.pad_token_id or 0, alpha, num_beams)
    for t in range(generated.shape[1] + 1):  # step by step, as generate calls it (one beam: through its KV cache)
        out = proc(generated[:, :t], scores)
        for r in range(rows):
            want = (1 + alpha) * F.log_softmax(scores[r], dim=-1)
            if alpha:
                want = want - alpha * _naive(lm, prompts[r // num_beams], generated[r, :t].tolist())
            torch.testing.assert_close(out[r], want, atol=1e-4, rtol=1e-4)


def test_contrast_prefers_what_the_evidence_adds(lm_and_tok):
    """A token the prompt makes likelier than the contrast prompt does gains rank; alpha 0 leaves the order."""
    lm, tok = lm_and_tok
    prompt = tok("likely findings: cardiomegaly")["input_ids"]
    empty = torch.zeros(1, 0, dtype=torch.long)
    contrast = _naive(lm, prompt, [])
    scores = torch.zeros(1, lm.config.vocab_size)  # a flat conditional: only the contrast term decides
    out = ContrastLogitsProcessor(lm, [prompt], 0, alpha=1.0)(empty, scores)
    assert int(out[0].argmax()) == int(contrast.argmin())
    flat = ContrastLogitsProcessor(lm, [prompt], 0, alpha=0.0)(empty, scores)
    assert torch.allclose(flat, F.log_softmax(scores, dim=-1))
