"""Projector heads: per-modality Linear-GELU-Linear to the shared space (L2-normalised) and the abnormality head.

These are the only weights that every model trains (seed 002): the towers may stay frozen.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class ProjectorConfig:
    """Sizes of the projector heads (saved as `projector.json`)."""

    image_dim: int
    text_dim: int
    hidden_dim: int = 512
    embed_dim: int = 256
    dropout: float = 0.0
    # Start the text head as a copy of the image head when both towers already share one space (BiomedCLIP),
    # so an untrained model keeps the towers' zero-shot alignment instead of scrambling it.
    tied_init: bool = False

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> ProjectorConfig:
        known = set(cls.__dataclass_fields__)
        extra = set(d) - known
        if extra:
            raise ValueError(f"unknown projector settings {sorted(extra)}")
        return cls(**d)


class Projector(nn.Module):
    """Standardise-Linear-GELU-Linear, output L2-normalised (computed in float32 so autocast keeps unit norms).

    The input is standardised per feature with running statistics (BatchNorm without affine weights): tower
    features share a large common component (cxr-tiny's image features had a mean pairwise cosine of 0.999 on the
    demo corpus), which left every projected image on one point. Untrained, the statistics are mean 0 / variance 1,
    so an untrained projector is unchanged by it."""

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int, dropout: float = 0.0):
        super().__init__()
        self.net = nn.Sequential(
            nn.BatchNorm1d(in_dim, affine=False),
            nn.Linear(in_dim, hidden_dim),
            nn.GELU(),
            nn.Dropout(dropout),
            nn.Linear(hidden_dim, out_dim),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.net(x.float()).float(), dim=-1)


class ProjectorHeads(nn.Module):
    """`image` and `text` projectors plus `abnormal` (Linear -> 1 logit on the image embedding, for BCE)."""

    def __init__(self, cfg: ProjectorConfig):
        super().__init__()
        self.cfg = cfg
        self.image = Projector(cfg.image_dim, cfg.hidden_dim, cfg.embed_dim, cfg.dropout)
        self.text = Projector(cfg.text_dim, cfg.hidden_dim, cfg.embed_dim, cfg.dropout)
        self.abnormal = nn.Linear(cfg.embed_dim, 1)
        if cfg.tied_init and cfg.image_dim == cfg.text_dim:
            self.text.load_state_dict(self.image.state_dict())

    def abnormal_logit(self, emb: torch.Tensor) -> torch.Tensor:
        """(B, embed_dim) -> (B,) logits; target: abnormal = any label other than No Finding."""
        return self.abnormal(emb.to(self.abnormal.weight.dtype)).squeeze(-1)
