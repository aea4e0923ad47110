"""The loss terms and their weighted sum against hand-rolled per-sample loops of the formulas, on tiny tensors."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from retrieval.labels import LABELS, label_matrix
from retrieval.losses import (
    LOSS_TERMS,
    LossInputs,
    SupConTerm,
    WeightedLoss,
    abnormal_targets,
    clamp_logit_scale_,
    initial_logit_scale,
    parse_loss_weights,
    positive_mask,
)


def multi_hot(label_sets) -> torch.Tensor:
    """The training label matrix (`label_matrix`) as the losses take it."""
    return torch.from_numpy(label_matrix(label_sets)[0])


def weighted(weights, img, txt, m, logits=None, temperature=0.07, **options):
    """The weighted loss of one batch at a fixed CLIP temperature (on the batch's device)."""
    scale = torch.tensor(initial_logit_scale(temperature), device=img.device)
    return WeightedLoss(weights, **options)(LossInputs(img, txt, m, scale, logits))


LABEL_SETS = [
    ["No Finding"],
    ["Cardiomegaly", "Edema"],
    ["Edema"],
    ["No Finding"],
    ["Edema", "Cardiomegaly"],
    ["Pneumothorax"],
]


def _emb(n: int, d: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(n, d, generator=g), dim=1)


def naive_positive(a: list[str], b: list[str], rule: str) -> bool:
    sa, sb = set(a), set(b)
    if rule == "same-set":
        return sa == sb
    if rule == "binary":
        return (sa != {"No Finding"}) == (sb != {"No Finding"})
    return len(sa & sb) > 0


def naive_clip(img: torch.Tensor, txt: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    n = img.shape[0]
    total_i = 0.0
    total_t = 0.0
    for i in range(n):
        row = [scale * torch.dot(img[i], txt[j]) for j in range(n)]
        total_i = total_i - (row[i] - torch.logsumexp(torch.stack(row), 0))
        col = [scale * torch.dot(txt[i], img[j]) for j in range(n)]
        total_t = total_t - (col[i] - torch.logsumexp(torch.stack(col), 0))
    return (total_i / n + total_t / n) / 2


def cos(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.dot(a, b) / (a.norm() * b.norm())


def naive_supcon(img: torch.Tensor, txt: torch.Tensor, label_sets: list[list[str]], rule: str, tau: float):
    emb = torch.cat([img, txt])
    sets = label_sets + label_sets
    losses = []
    for i in range(len(sets)):
        others = [j for j in range(len(sets)) if j != i]
        pos = [j for j in others if naive_positive(sets[i], sets[j], rule)]
        if not pos:
            continue
        denom = torch.logsumexp(torch.stack([cos(emb[i], emb[a]) / tau for a in others]), 0)
        li = -sum(cos(emb[i], emb[p]) / tau - denom for p in pos) / len(pos)
        losses.append(li)
    return torch.stack(losses).mean()


def naive_bce(logits: torch.Tensor, label_sets: list[list[str]]) -> torch.Tensor:
    total = 0.0
    for x, labels in zip(logits, label_sets, strict=True):
        y = 0.0 if set(labels) == {"No Finding"} else 1.0
        p = 1 / (1 + math.exp(-float(x)))
        total += -(y * math.log(p) + (1 - y) * math.log(1 - p))
    return torch.tensor(total / len(label_sets))


def test_multi_hot_and_targets():
    m = multi_hot(LABEL_SETS + [[], ["Something New"]])
    assert m.shape == (8, len(LABELS) + 1)
    assert m[6, 0] and m[6].sum() == 1  # empty set = No Finding
    assert m[7, len(LABELS)] and m[7].sum() == 1  # unknown label kept in an extra column
    assert abnormal_targets(m).tolist() == [0, 1, 1, 0, 1, 1, 0, 1]


@pytest.mark.parametrize("rule", ["same-set", "binary", "overlap"])
def test_positive_mask_matches_naive_rule(rule):
    mask = positive_mask(multi_hot(LABEL_SETS), rule)
    for i, a in enumerate(LABEL_SETS):
        for j, b in enumerate(LABEL_SETS):
            assert bool(mask[i, j]) == naive_positive(a, b, rule), (rule, a, b)
    # the three rules really differ on this batch
    assert not mask[1, 2] if rule == "same-set" else True
    assert mask[1, 5] if rule == "binary" else not mask[1, 5]


def test_clip_term_and_temperature_gradient_match_naive():
    img, txt = _emb(5, 8, 0), _emb(5, 8, 1)
    scale = torch.tensor(initial_logit_scale(0.2), requires_grad=True)
    out = WeightedLoss({"clip": 1})(LossInputs(img, txt, multi_hot(LABEL_SETS[:5]), scale))
    assert set(out) == {"loss", "clip"}
    out["loss"].backward()
    grad = scale.grad.clone()

    log_s = torch.tensor(math.log(1 / 0.2), requires_grad=True)
    ref = naive_clip(img, txt, log_s.exp())
    ref.backward()
    assert torch.allclose(out["clip"], ref, atol=1e-5)
    assert torch.allclose(grad, log_s.grad, atol=1e-5)

    # closed form: dL/dlog s = s/2 * mean_i[(E_row_i[sim] - sim_ii) + (E_col_i[sim] - sim_ii)] (softmax E)
    s = 1 / 0.2
    sim = img @ txt.T
    pr, pc = torch.softmax(s * sim, 1), torch.softmax(s * sim.T, 1)
    diag = sim.diag()
    closed = s / 2 * (((pr * sim).sum(1) - diag).mean() + ((pc * sim.T).sum(1) - diag).mean())
    assert torch.allclose(grad, closed, atol=1e-5)
    assert grad.abs() > 1e-4  # the temperature does learn


def test_temperature_clamp():
    scale = torch.nn.Parameter(torch.tensor(initial_logit_scale(0.001)))
    clamp_logit_scale_(scale)
    assert math.isclose(scale.exp().item(), 100.0, rel_tol=1e-5)
    scale = torch.nn.Parameter(torch.tensor(initial_logit_scale(3.0)))
    clamp_logit_scale_(scale)
    assert scale.item() == 0.0  # inverse temperature at least 1
    untouched = torch.nn.Parameter(torch.tensor(initial_logit_scale(0.07)))
    clamp_logit_scale_(untouched)
    assert math.isclose(untouched.exp().item(), 1 / 0.07, rel_tol=1e-5)


@pytest.mark.parametrize("rule", ["same-set", "binary", "overlap"])
def test_supcon_term_matches_naive(rule, test_device):
    img = _emb(6, 8, 2).to(test_device).requires_grad_()
    txt = _emb(6, 8, 3).to(test_device).requires_grad_()
    m = multi_hot(LABEL_SETS).to(test_device)
    out = weighted({"supcon": 1}, img, txt, m, positive_rule=rule, supcon_temperature=0.3)
    ref = naive_supcon(img.cpu(), txt.cpu(), LABEL_SETS, rule, 0.3)  # the naive reference, on the CPU
    assert torch.allclose(out["supcon"].cpu(), ref, atol=1e-5), (out["supcon"], ref)
    g_out = torch.autograd.grad(out["loss"], [img, txt])
    g_ref = torch.autograd.grad(ref, [img, txt])
    for a, b in zip(g_out, g_ref, strict=True):
        assert torch.allclose(a.cpu(), b.cpu(), atol=1e-5)


def test_positive_rules_give_different_supcon():
    img, txt = _emb(6, 8, 4), _emb(6, 8, 5)
    m = multi_hot(LABEL_SETS)
    values = {
        rule: weighted({"supcon": 1}, img, txt, m, positive_rule=rule)["loss"]
        for rule in ("same-set", "binary", "overlap")
    }
    assert len({round(float(v), 5) for v in values.values()}) == 3


def test_bce_term_matches_naive_and_tiles_over_modalities():
    g = torch.Generator().manual_seed(6)
    logits = torch.randn(6, generator=g)
    m = multi_hot(LABEL_SETS)

    def loss_fn(img, txt, m, logits):
        return weighted({"bce": 1}, img, txt, m, logits)

    out = loss_fn(_emb(6, 4, 0), _emb(6, 4, 1), m, logits)
    assert torch.allclose(out["bce"], naive_bce(logits, LABEL_SETS), atol=1e-6)
    both = torch.cat([logits, -logits])
    ref_both = (naive_bce(logits, LABEL_SETS) + naive_bce(-logits, LABEL_SETS)) / 2
    assert torch.allclose(loss_fn(_emb(6, 4, 0), _emb(6, 4, 1), m, both)["bce"], ref_both, atol=1e-6)
    with pytest.raises(ValueError):
        loss_fn(_emb(6, 4, 0), _emb(6, 4, 1), m, logits[:4])


def test_composite_is_weighted_sum_and_terms_switch_off(test_device):
    img, txt = _emb(6, 8, 7).to(test_device), _emb(6, 8, 8).to(test_device)
    logits = torch.linspace(-2, 2, 6, device=test_device)
    m = multi_hot(LABEL_SETS).to(test_device)
    out = weighted({"clip": 0.5, "supcon": 2.0, "bce": 3.0}, img, txt, m, logits)
    assert list(out) == ["loss", "clip", "supcon", "bce"]  # the terms in LOSS_TERMS order
    assert torch.allclose(out["loss"], 0.5 * out["clip"] + 2.0 * out["supcon"] + 3.0 * out["bce"])
    only_clip = weighted({"clip": 1, "supcon": 0}, img, txt, m)  # a weight of 0 or a missing term: off
    assert set(only_clip) == {"loss", "clip"}
    assert torch.equal(only_clip["loss"], out["clip"])
    assert not WeightedLoss({"clip": 1}).needs_abnormal_logits and WeightedLoss({"bce": 1}).needs_abnormal_logits
    for bad in ({"clip": 0, "supcon": 0, "bce": 0}, {}, {"clip": -1, "bce": 1}, {"clip": 1, "triplet": 1}):
        with pytest.raises(ValueError):
            WeightedLoss(bad)
    with pytest.raises(ValueError):
        SupConTerm(positive_rule="nope")
    with pytest.raises(ValueError):
        weighted({"bce": 1}, img, txt, m)  # BCE without logits


def test_parse_loss_weights():
    assert parse_loss_weights("1, 0.5,0") == {"clip": 1.0, "supcon": 0.5, "bce": 0.0}
    assert list(parse_loss_weights("1,1,1")) == list(LOSS_TERMS)
    for bad in ("1,1", "a,b,c", "0,0,0", "-1,1,1"):
        with pytest.raises(ValueError):
            parse_loss_weights(bad)
