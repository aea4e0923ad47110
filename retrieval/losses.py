"""The loss terms of retrieval training: CLIP (InfoNCE) + supervised contrastive + BCE (abnormality head).

Each term is a small module named in `LOSS_TERMS`; `WeightedLoss(weights)` sums them with a weights dict
(`{"clip": 1, "supcon": 1, "bce": 1}`), and a weight of 0 switches a term off (for ablations):

- CLIP: open_clip's `ClipLoss`, symmetric InfoNCE over the batch's image/report pairs, at a learnable
  temperature given as `logit_scale` (log of the inverse temperature, CLIP's init 1/0.07, capped at 100); the
  training task (`retrieval.training.task`) owns that parameter.
- SupCon: pytorch-metric-learning's `SupConLoss` on the concatenation [image embeddings; report embeddings],
  so positives cross modalities. Which studies count as positives is the *positive rule* (on the label sets):
    * `same-set`: identical label sets (e.g. {Edema, Cardiomegaly} only matches {Cardiomegaly, Edema});
    * `binary`:   same normal/abnormal class (abnormal = any label other than "No Finding");
    * `overlap`:  the sets share at least one label ("No Finding" counts, so normal matches normal).
  An image and its own report are positives under every rule. `same-set` and `binary` reduce to integer class
  ids (pml's usual `labels=` path); `overlap` is not an equivalence relation, so it is passed to pml as an
  `indices_tuple` of all (anchor, positive) and (anchor, negative) pairs; pml's SupConLoss then uses exactly
  those pairs as numerator and denominator (the anchor itself is in neither).
- BCE: `binary_cross_entropy_with_logits` of the abnormality head's logits against abnormal (1) / normal (0).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from open_clip.loss import ClipLoss
from pytorch_metric_learning.losses import SupConLoss
from torch import nn

from retrieval.labels import abnormal_rows

POSITIVE_RULES = ("same-set", "binary", "overlap")
# Chosen by benchmarks/retrieval_ablation.py: `binary` had the best image->report label mAP on the demo corpus
# and covid-cxr (3 seeds), though within about one standard deviation of `overlap`; `same-set` was worst on demo.
DEFAULT_POSITIVE_RULE = "binary"
MAX_LOGIT_SCALE = 100.0
CLIP_INIT_TEMPERATURE = 0.07


def abnormal_targets(label_matrix: torch.Tensor, no_finding_column: int = 0) -> torch.Tensor:
    """(B,) float: 1 where any label other than "No Finding" is set."""
    return abnormal_rows(label_matrix, no_finding_column).float()


def positive_mask(label_matrix: torch.Tensor, rule: str) -> torch.Tensor:
    """(B, B) bool: study i and study j are positives under `rule` (the diagonal is always True)."""
    m = label_matrix.bool()
    if rule == "same-set":
        return (m.unsqueeze(1) == m.unsqueeze(0)).all(dim=2)
    if rule == "binary":
        ab = abnormal_targets(m).bool()
        return ab.unsqueeze(1) == ab.unsqueeze(0)
    if rule == "overlap":
        f = m.float()
        return (f @ f.T) > 0
    raise ValueError(f"positive rule must be one of {POSITIVE_RULES}, got {rule!r}")


def class_ids(label_matrix: torch.Tensor, rule: str) -> torch.Tensor:
    """(B,) integer class id per study for the equivalence rules (`same-set`, `binary`)."""
    m = label_matrix.bool()
    if rule == "binary":
        return abnormal_targets(m).long()
    if rule == "same-set":
        _, ids = torch.unique(m, dim=0, return_inverse=True)
        return ids.long()
    raise ValueError(f"rule {rule!r} has no integer class ids; only 'same-set' and 'binary' do")


def initial_logit_scale(temperature: float = CLIP_INIT_TEMPERATURE) -> float:
    """CLIP's learnable temperature is held as the log of the inverse temperature."""
    return math.log(1.0 / temperature)


def clamp_logit_scale_(logit_scale: torch.Tensor) -> None:
    """Keep the inverse temperature in [1, 100] (open_clip's clamp, after each optimiser step)."""
    with torch.no_grad():
        logit_scale.clamp_(0.0, math.log(MAX_LOGIT_SCALE))


@dataclass
class LossInputs:
    """One batch as the loss terms see it; row i of each tensor is study i."""

    image_emb: torch.Tensor  # (B, D), L2-normalised
    text_emb: torch.Tensor  # (B, D), L2-normalised
    label_matrix: torch.Tensor  # (B, L), `retrieval.labels.label_matrix`
    logit_scale: torch.Tensor | None = None  # log inverse temperature (the CLIP term)
    abnormal_logits: torch.Tensor | None = None  # (k*B,) the abnormality head's logits (the BCE term)


class ClipTerm(nn.Module):
    """Symmetric InfoNCE (open_clip's `ClipLoss`) at the batch's temperature `exp(logit_scale)`."""

    needs_abnormal_logits = False

    def __init__(self, **_options: object):
        super().__init__()
        self.clip_loss = ClipLoss()

    def forward(self, x: LossInputs) -> torch.Tensor:
        if x.logit_scale is None:
            raise ValueError("the CLIP term needs logit_scale")
        return self.clip_loss(x.image_emb, x.text_emb, x.logit_scale.exp())


class SupConTerm(nn.Module):
    """pml's `SupConLoss` over [images; reports] with positives from the label sets under `positive_rule`."""

    needs_abnormal_logits = False

    def __init__(self, positive_rule: str = DEFAULT_POSITIVE_RULE, supcon_temperature: float = 0.1, **_options: object):
        super().__init__()
        if positive_rule not in POSITIVE_RULES:
            raise ValueError(f"positive rule must be one of {POSITIVE_RULES}, got {positive_rule!r}")
        self.positive_rule = positive_rule
        self.supcon_loss = SupConLoss(temperature=supcon_temperature)

    def forward(self, x: LossInputs) -> torch.Tensor:
        emb = torch.cat([x.image_emb, x.text_emb], dim=0)
        if self.positive_rule in ("same-set", "binary"):
            ids = class_ids(x.label_matrix, self.positive_rule).to(emb.device)
            return self.supcon_loss(emb, torch.cat([ids, ids]))
        pos = positive_mask(x.label_matrix, self.positive_rule).to(emb.device).repeat(2, 2)
        eye = torch.eye(pos.shape[0], dtype=torch.bool, device=emb.device)
        a1, p = torch.where(pos & ~eye)
        a2, n = torch.where(~pos)
        return self.supcon_loss(emb, indices_tuple=(a1, p, a2, n))


class BCETerm(nn.Module):
    """BCE of the abnormality logits; (k*B,) logits (e.g. images then reports) get the targets tiled."""

    needs_abnormal_logits = True

    def __init__(self, **_options: object):
        super().__init__()

    def forward(self, x: LossInputs) -> torch.Tensor:
        if x.abnormal_logits is None:
            raise ValueError("the BCE term needs abnormal_logits (or give it weight 0)")
        targets = abnormal_targets(x.label_matrix).to(x.abnormal_logits.device)
        reps = x.abnormal_logits.shape[0] // targets.shape[0]
        if reps * targets.shape[0] != x.abnormal_logits.shape[0]:
            raise ValueError("abnormal_logits length must be a multiple of the batch size")
        return F.binary_cross_entropy_with_logits(x.abnormal_logits.float(), targets.repeat(reps))


# Every loss term by name, in the order they are summed and reported. A new term is a class above and a line here.
LOSS_TERMS: dict[str, type[nn.Module]] = {"clip": ClipTerm, "supcon": SupConTerm, "bce": BCETerm}
DEFAULT_LOSS_WEIGHTS: dict[str, float] = {"clip": 1.0, "supcon": 1.0, "bce": 1.0}


def check_loss_weights(weights: Mapping[str, float]) -> dict[str, float]:
    """{term: weight} over LOSS_TERMS (a missing term weighs 0); raises ValueError for unknown names, a weight
    below 0 or all weights 0."""
    unknown = sorted(set(weights) - set(LOSS_TERMS))
    if unknown:
        raise ValueError(f"unknown loss terms {unknown}; the terms are {', '.join(LOSS_TERMS)}")
    out = {name: float(weights.get(name, 0.0)) for name in LOSS_TERMS}
    if min(out.values()) < 0 or max(out.values()) == 0:
        raise ValueError(f"loss weights must be >= 0 with at least one > 0, got {dict(weights)}")
    return out


class WeightedLoss(nn.Module):
    """The weighted sum of the terms whose weight is > 0 (as pml's `MultipleLosses(losses, weights)`).

    `options` go to every term (`positive_rule`, `supcon_temperature`); each takes the ones it uses."""

    def __init__(self, weights: Mapping[str, float] = DEFAULT_LOSS_WEIGHTS, **options: object):
        super().__init__()
        self.weights = {k: w for k, w in check_loss_weights(weights).items() if w > 0}
        self.terms = nn.ModuleDict({k: LOSS_TERMS[k](**options) for k in self.weights})

    @property
    def needs_abnormal_logits(self) -> bool:
        return any(term.needs_abnormal_logits for term in self.terms.values())

    def forward(self, x: LossInputs) -> dict[str, torch.Tensor]:
        """Returns {"loss": the weighted sum, and each enabled term by name, unweighted}."""
        x = replace(x, image_emb=x.image_emb.float(), text_emb=x.text_emb.float())
        terms = {name: term(x) for name, term in self.terms.items()}
        total = x.image_emb.new_zeros(())
        for name, value in terms.items():
            total = total + self.weights[name] * value
        return {"loss": total, **terms}


def parse_loss_weights(text: str) -> dict[str, float]:
    """'1,0.5,0' -> {"clip": 1, "supcon": 0.5, "bce": 0}, one number per term of LOSS_TERMS in order; raises
    ValueError on anything else."""
    names = ",".join(LOSS_TERMS)
    parts = [p.strip() for p in text.split(",")]
    if len(parts) != len(LOSS_TERMS):
        raise ValueError(f"loss weights must be {len(LOSS_TERMS)} numbers '{names}', got {text!r}")
    try:
        values = [float(p) for p in parts]
    except ValueError:
        raise ValueError(f"loss weights must be numbers '{names}', got {text!r}") from None
    return check_loss_weights(dict(zip(LOSS_TERMS, values, strict=True)))
