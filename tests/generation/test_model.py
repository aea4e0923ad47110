"""The VLM's pieces: token grouping, pooling, the answer-only loss, decoding, save/load, the tokenizer."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gen_synth import UNIT_LM, one_thread  # noqa: F401 (an autouse fixture)

from generation.data.rag import build_prompt_ids
from generation.model.encoders import FrozenPatchEncoder, combine_tokens, encode_visual, pool_grid
from generation.model.tokenizer import COORD_TOKENS, TASK_TOKENS, build_tokenizer, decode
from generation.model.vlm import VLM, group_tokens
from retrieval.errors import ModelLoadError


def test_group_tokens_concatenates_five_adjacent():
    x = torch.arange(2 * 12 * 3, dtype=torch.float32).reshape(2, 12, 3)
    g = group_tokens(x)
    assert g.shape == (2, 3, 15)
    assert torch.equal(g[1, 0], x[1, :5].reshape(-1))  # tokens 0..4 side by side
    assert torch.equal(g[0, 2, :6], x[0, 10:12].reshape(-1)) and not g[0, 2, 6:].any()  # zero-padded tail


def test_pool_grid_and_combine():
    x = torch.randn(2, 64, 4)
    assert pool_grid(x, 8) is x
    p = pool_grid(x, 4)
    img = x.transpose(1, 2).reshape(2, 4, 8, 8)
    assert torch.allclose(p[0, 0], img[0, :, :2, :2].mean((1, 2)))  # top-left 2x2 patch mean
    assert pool_grid(torch.randn(1, 65, 4), 4).shape == (1, 16, 4)  # class token dropped
    c = combine_tokens([torch.randn(2, 16, 3), torch.randn(2, 16, 5)])
    assert c.shape == (2, 16, 8)


def test_multi_encoder_features_concatenate():
    imgs = [np.random.default_rng(i).random((40, 50)).astype(np.float32) for i in range(3)]
    e1, e2 = FrozenPatchEncoder(1, 64, 16, 8), FrozenPatchEncoder(2, 64, 8, 6)
    v = encode_visual([e1, e2], imgs, grid=4)[0]
    assert v.shape == (3, 16, 14)
    assert torch.allclose(v[..., :8], encode_visual([e1], imgs, grid=4)[0])
    assert not torch.allclose(FrozenPatchEncoder(1).patchify.weight, FrozenPatchEncoder(2).patchify.weight)


@pytest.fixture(scope="module")
def vlm():
    torch.manual_seed(0)
    return VLM.create(12, [{"spec": "test"}], lm_overrides=UNIT_LM, corpus=["the heart is normal.", "no"])


def _batch(vlm):
    tok = vlm.tok
    prompts = [
        build_prompt_ids(tok, "report", "describe.", [], 32)[0],
        build_prompt_ids(tok, "vqa", "is it?", [], 32)[0],
    ]
    targets = [
        tok("the heart is normal.", add_special_tokens=False)["input_ids"],
        tok("no", add_special_tokens=False)["input_ids"],
    ]
    return torch.randn(2, 16, 12), prompts, targets


def test_loss_only_on_answer_tokens_matches_full_lm_loss(vlm):
    visual, prompts, targets = _batch(vlm)
    loss = vlm(visual, prompts, targets)
    # reference: the LM's own loss over the full padded sequence with everything but answers masked
    tok = vlm.tok
    img = vlm._image_embeds(visual)
    n = img.shape[1]
    seqs = [p + t + [tok.sep_token_id] for p, t in zip(prompts, targets)]
    length = max(map(len, seqs))
    ids = torch.full((2, length), tok.pad_token_id)
    labels = torch.full((2, n + length), -100)
    mask = torch.zeros((2, n + length), dtype=torch.long)
    for i, (s, p) in enumerate(zip(seqs, prompts)):
        ids[i, : len(s)] = torch.tensor(s)
        labels[i, n + len(p) : n + len(s)] = torch.tensor(s[len(p) :])
        mask[i, : n + len(s)] = 1
    emb = torch.cat([img, vlm.lm.get_input_embeddings()(ids)], 1)
    ref = vlm.lm(inputs_embeds=emb, attention_mask=mask, labels=labels).loss
    assert torch.allclose(loss, ref, atol=1e-5)


def test_overfits_and_decodes_with_left_padding(vlm, tmp_path):
    visual, prompts, targets = _batch(vlm)
    opt = torch.optim.AdamW(vlm.parameters(), 1e-2)
    for _ in range(60):
        loss = vlm(visual, prompts, targets)
        opt.zero_grad()
        loss.backward()
        opt.step()
    vlm.eval()
    out = vlm.generate(visual, prompts, max_new_tokens=10)
    assert out == targets  # different prompt lengths: left padding must not change the answers
    alone = vlm.generate(visual[1:], prompts[1:], max_new_tokens=10)
    assert alone == targets[1:]
    vlm.save(tmp_path / "v", encoders=[FrozenPatchEncoder(3, 32, 8, 12)])
    back = VLM.load(tmp_path / "v")
    assert back.generate(visual, prompts, max_new_tokens=10) == targets
    encs = back.load_encoders(tmp_path / "v")
    assert torch.equal(encs[0].patchify.weight, FrozenPatchEncoder(3, 32, 8, 12).patchify.weight)
    with pytest.raises(ModelLoadError):
        VLM.load(tmp_path / "missing")


def test_tokenizer_keeps_task_and_coordinate_tokens():
    tok = build_tokenizer(corpus=["cardiomegaly"])
    text = "[identify] cardiomegaly {<20><45><70><80>}"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    pieces = tok.convert_ids_to_tokens(ids)
    assert pieces[0] == TASK_TOKENS["identify"] and "<45>" in pieces and len(ids) == 1 + 4 + 6
    assert decode(tok, ids) == "[identify] cardiomegaly { <20> <45> <70> <80> }"
    full = build_tokenizer()
    assert len(tok) < len(full) / 5  # pruned to the corpus + single characters
    assert all(tok.convert_tokens_to_ids(c) != tok.unk_token_id for c in COORD_TOKENS)
    # a word the corpus never used still tokenizes (character pieces), never to [UNK]
    assert tok.unk_token_id not in tok("pneumothorax", add_special_tokens=False)["input_ids"]


def test_aux_finding_head_adds_its_loss_trains_the_projector_and_round_trips(tmp_path):
    torch.manual_seed(0)
    vlm = VLM.create(12, [{"spec": "test"}], lm_overrides=UNIT_LM, corpus=["the heart is normal.", "no"], aux_labels=3)
    tok = vlm.tok
    prompt, target = [tok.cls_token_id], tok("no", add_special_tokens=False)["input_ids"]
    visual = torch.randn(2, 10, 12)
    labels = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 1.0]])
    plain = vlm(visual, [prompt] * 2, [target] * 2)
    both = vlm(visual, [prompt] * 2, [target] * 2, labels, aux_weight=1.0)
    assert float(both.detach()) > float(plain.detach())  # BCE is positive
    vlm.zero_grad()
    (both - plain).backward()  # the aux term alone reaches the projector
    assert vlm.projector[0].weight.grad.abs().sum() > 0
    vlm.save(tmp_path / "v")
    back = VLM.load(tmp_path / "v")
    assert torch.equal(back.aux_head.weight, vlm.aux_head.weight)
    assert VLM.create(12, [{"spec": "test"}], lm_overrides=UNIT_LM, corpus=["no"]).aux_head is None


def _coord_batch(vlm, value: int):
    tok = vlm.tok
    prompt = build_prompt_ids(tok, "ground", "heart", [], 32)[0]
    target = tok(f"{{<{value}><10><60><70>}}", add_special_tokens=False)["input_ids"]
    return torch.randn(1, 10, 12, generator=torch.Generator().manual_seed(1)), [prompt], [target]


def test_soft_coordinate_targets_cost_less_for_a_near_miss_than_a_far_one():
    torch.manual_seed(0)
    vlm = VLM.create(12, [{"spec": "t"}], lm_overrides=UNIT_LM, corpus=["heart"], coord_sigma=2.0)
    tok = vlm.tok
    # logits that put all mass on <42> at every answer position: the target <40> is a near miss, <90> a far one
    logits = torch.full((1, len(tok)), -20.0)
    logits[0, tok.convert_tokens_to_ids("<42>")] = 20.0
    near = vlm._token_losses(logits, torch.tensor([tok.convert_tokens_to_ids("<40>")]))
    far = vlm._token_losses(logits, torch.tensor([tok.convert_tokens_to_ids("<90>")]))
    assert float(near) < float(far)
    word = torch.tensor([tok.convert_tokens_to_ids("heart")])
    assert torch.allclose(
        vlm._token_losses(logits, word), torch.nn.functional.cross_entropy(logits, word, reduction="none")
    )
    hard = VLM.create(12, [{"spec": "t"}], lm_overrides=UNIT_LM, corpus=["heart"])
    assert torch.allclose(  # one-hot (sigma 0): a near miss is as wrong as any other token
        hard._token_losses(logits, torch.tensor([tok.convert_tokens_to_ids("<40>")])),
        hard._token_losses(logits, torch.tensor([tok.convert_tokens_to_ids("<90>")])),
    )


def test_coordinate_embeddings_start_ordered():
    torch.manual_seed(0)
    vlm = VLM.create(12, [{"spec": "t"}], lm_overrides=UNIT_LM, corpus=["heart"], coord_init=True)
    emb = vlm.lm.get_input_embeddings().weight
    ids = [vlm.tok.convert_tokens_to_ids(c) for c in COORD_TOKENS]
    sim = torch.nn.functional.cosine_similarity(emb[ids[40]][None], emb[ids], dim=-1).detach()
    # neighbours on the grid start nearly equal, coordinates 15+ units away clearly apart (Fourier features have
    # side lobes, so similarity is not monotonic beyond the main lobe)
    assert sim[39] > 0.9 and sim[41] > 0.9
    assert max(float(sim[i]) for i in range(101) if abs(i - 40) >= 15) < 0.6
    plain = VLM.create(12, [{"spec": "t"}], lm_overrides=UNIT_LM, corpus=["heart"])
    assert abs(float(emb.std()) - float(plain.lm.get_input_embeddings().weight.std())) < 0.01


def test_example_loss_norm_weighs_each_example_equally():
    torch.manual_seed(0)
    corpus = ["the heart is normal.", "no"]
    vlm = VLM.create(12, [{"spec": "t"}], lm_overrides=UNIT_LM, corpus=corpus, loss_norm="example")
    visual, prompts, targets = _batch(vlm)  # a 6-token report and a 1-token answer
    both = vlm(visual, prompts, targets)
    each = [vlm(visual[i : i + 1], prompts[i : i + 1], targets[i : i + 1]) for i in range(2)]
    assert torch.allclose(both, (each[0] + each[1]) / 2, atol=1e-5)
    vlm.config.loss_norm = "token"
    assert not torch.allclose(vlm(visual, prompts, targets), both, atol=1e-4)
    with pytest.raises(ValueError):
        VLM.create(12, [{"spec": "t"}], lm_overrides=UNIT_LM, corpus=["no"], loss_norm="tokens")


def test_answer_log_likelihood_matches_full_logits_and_picks_the_likelier_answer(vlm):
    """The teacher-forced answer score equals the log-softmax of the LM's full logits at the answer positions
    (the naive reference: one left-to-right pass over image + prompt + answer, no masking tricks), and
    `lm_closed_answers` picks the answer with the larger score."""
    from generation.model.collate import splice_image
    from generation.writing.lm_answers import lm_closed_answers

    tok = vlm.tok
    gen = torch.Generator().manual_seed(1)
    visual = torch.randn(2, 4, 12, generator=gen)
    prompts = [build_prompt_ids(tok, "vqa", q, [], 32)[0] for q in ("is there cardiomegaly?", "is there edema?")]
    answers = [tok("yes", add_special_tokens=False)["input_ids"], tok("no", add_special_tokens=False)["input_ids"]]
    got = vlm.answer_log_likelihood(visual, prompts, answers)
    with torch.no_grad():
        for i in range(2):
            ids = torch.tensor([prompts[i] + answers[i]])
            img = vlm._image_embeds(visual[i : i + 1])
            emb = splice_image(img, vlm.lm.get_input_embeddings()(ids), [0])
            logp = torch.log_softmax(vlm.lm(inputs_embeds=emb).logits[0].float(), dim=-1)
            start = img.shape[1] + len(prompts[i])
            ref = sum(float(logp[start - 1 + j, t]) for j, t in enumerate(answers[i]))
            assert float(got[i]) == pytest.approx(ref, abs=1e-4)
    both = []
    for word in ("yes", "no"):
        forms = [tok(f, add_special_tokens=False)["input_ids"] for f in (word, word.capitalize())]
        both.append(torch.stack([vlm.answer_log_likelihood(visual, prompts, [f, f]) for f in forms]).max(0).values)
    expect = ["yes" if float(both[0][i]) > float(both[1][i]) else "no" for i in range(2)]
    assert lm_closed_answers(vlm, visual, prompts) == expect
    assert lm_closed_answers(vlm, visual[:0], []) == []
