"""The composite training loss of seed 002: CLIP (InfoNCE) + supervised contrastive + BCE (abnormality head).

Each term comes from a well-kept library and is weighted; a weight of 0 switches the term off (for ablations):

- CLIP: open_clip's `ClipLoss`, symmetric InfoNCE over the batch's image/report pairs, with a learnable
  temperature held here as `logit_scale` (log of the inverse temperature, CLIP's init 1/0.07, capped at 100).
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
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from open_clip.loss import ClipLoss
from pytorch_metric_learning.losses import SupConLoss
from torch import nn

from retrieval.labels import LABELS, NO_FINDING, abnormal_rows

POSITIVE_RULES = ("same-set", "binary", "overlap")
# Chosen by benchmarks/retrieval_ablation.py: `binary` had the best image->report label mAP on the demo corpus
# and covid-cxr (3 seeds), though within about one standard deviation of `overlap`; `same-set` was worst on demo.
DEFAULT_POSITIVE_RULE = "binary"
MAX_LOGIT_SCALE = 100.0


def multi_hot(label_lists: Sequence[Sequence[str]], vocabulary: Sequence[str] = LABELS) -> torch.Tensor:
    """(B, L) bool matrix of label sets; an empty set means "No Finding"; labels outside `vocabulary` get
    extra columns (in first-seen order) so that no label is silently dropped."""
    vocab = list(vocabulary)
    index = {name: i for i, name in enumerate(vocab)}
    rows = []
    for labels in label_lists:
        names = list(labels) if len(labels) else [NO_FINDING]
        for name in names:
            if name not in index:
                index[name] = len(vocab)
                vocab.append(name)
        rows.append([index[name] for name in names])
    out = torch.zeros(len(rows), len(vocab), dtype=torch.bool)
    for r, cols in enumerate(rows):
        out[r, cols] = True
    return out


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


class CompositeLoss(nn.Module):
    """Weighted CLIP + SupCon + BCE. Holds the learnable CLIP temperature (`logit_scale`): train it with
    the model and call `clamp_logit_scale_()` after each optimiser step (as open_clip's trainer does)."""

    def __init__(
        self,
        clip_weight: float = 1.0,
        supcon_weight: float = 1.0,
        bce_weight: float = 1.0,
        positive_rule: str = DEFAULT_POSITIVE_RULE,
        supcon_temperature: float = 0.1,
        init_temperature: float = 0.07,
        learn_temperature: bool = True,
    ):
        super().__init__()
        if positive_rule not in POSITIVE_RULES:
            raise ValueError(f"positive rule must be one of {POSITIVE_RULES}, got {positive_rule!r}")
        if min(clip_weight, supcon_weight, bce_weight) < 0:
            raise ValueError("loss weights must be >= 0")
        if clip_weight == supcon_weight == bce_weight == 0:
            raise ValueError("at least one loss weight must be > 0")
        self.clip_weight = float(clip_weight)
        self.supcon_weight = float(supcon_weight)
        self.bce_weight = float(bce_weight)
        self.positive_rule = positive_rule
        self.logit_scale = nn.Parameter(
            torch.tensor(math.log(1.0 / init_temperature)), requires_grad=learn_temperature
        )
        self.clip_loss = ClipLoss()
        self.supcon_loss = SupConLoss(temperature=supcon_temperature)

    def clamp_logit_scale_(self) -> None:
        """Keep the inverse temperature in [1, 100] (open_clip's clamp)."""
        with torch.no_grad():
            self.logit_scale.clamp_(0.0, math.log(MAX_LOGIT_SCALE))

    def clip_term(self, image_emb: torch.Tensor, text_emb: torch.Tensor) -> torch.Tensor:
        """Symmetric InfoNCE; row i of each is the same study."""
        return self.clip_loss(image_emb, text_emb, self.logit_scale.exp())

    def supcon_term(
        self, image_emb: torch.Tensor, text_emb: torch.Tensor, label_matrix: torch.Tensor
    ) -> torch.Tensor:
        """SupCon over [images; reports] with positives from the label sets under `positive_rule`."""
        emb = torch.cat([image_emb, text_emb], dim=0)
        if self.positive_rule in ("same-set", "binary"):
            ids = class_ids(label_matrix, self.positive_rule).to(emb.device)
            return self.supcon_loss(emb, torch.cat([ids, ids]))
        pos = positive_mask(label_matrix, self.positive_rule).to(emb.device).repeat(2, 2)
        eye = torch.eye(pos.shape[0], dtype=torch.bool, device=emb.device)
        a1, p = torch.where(pos & ~eye)
        a2, n = torch.where(~pos)
        return self.supcon_loss(emb, indices_tuple=(a1, p, a2, n))

    def bce_term(self, abnormal_logits: torch.Tensor, label_matrix: torch.Tensor) -> torch.Tensor:
        """BCE of the abnormality logits; (k*B,) logits (e.g. images then reports) get the targets tiled."""
        targets = abnormal_targets(label_matrix).to(abnormal_logits.device)
        reps = abnormal_logits.shape[0] // targets.shape[0]
        if reps * targets.shape[0] != abnormal_logits.shape[0]:
            raise ValueError("abnormal_logits length must be a multiple of the batch size")
        return F.binary_cross_entropy_with_logits(abnormal_logits.float(), targets.repeat(reps))

    def forward(
        self,
        image_emb: torch.Tensor,
        text_emb: torch.Tensor,
        label_matrix: torch.Tensor,
        abnormal_logits: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """Returns {"loss": weighted sum, "clip"/"supcon"/"bce": each enabled term, unweighted}.

        `image_emb`, `text_emb`: (B, D) L2-normalised, row i = study i; `label_matrix`: (B, L), `multi_hot`.
        """
        image_emb, text_emb = image_emb.float(), text_emb.float()
        terms: dict[str, torch.Tensor] = {}
        total = image_emb.new_zeros(())
        if self.clip_weight > 0:
            terms["clip"] = self.clip_term(image_emb, text_emb)
            total = total + self.clip_weight * terms["clip"]
        if self.supcon_weight > 0:
            terms["supcon"] = self.supcon_term(image_emb, text_emb, label_matrix)
            total = total + self.supcon_weight * terms["supcon"]
        if self.bce_weight > 0:
            if abnormal_logits is None:
                raise ValueError("the BCE term needs abnormal_logits (or set bce_weight=0)")
            terms["bce"] = self.bce_term(abnormal_logits, label_matrix)
            total = total + self.bce_weight * terms["bce"]
        return {"loss": total, **terms}


def parse_loss_weights(text: str) -> tuple[float, float, float]:
    """'1,0.5,0' -> (clip, supcon, bce) weights; raises ValueError on anything else."""
    parts = [p.strip() for p in text.split(",")]
    if len(parts) != 3:
        raise ValueError(f"loss weights must be three numbers 'clip,supcon,bce', got {text!r}")
    try:
        weights = tuple(float(p) for p in parts)
    except ValueError:
        raise ValueError(f"loss weights must be numbers 'clip,supcon,bce', got {text!r}") from None
    if min(weights) < 0 or max(weights) == 0:
        raise ValueError(f"loss weights must be >= 0 with at least one > 0, got {text!r}")
    return weights  # type: ignore[return-value]
