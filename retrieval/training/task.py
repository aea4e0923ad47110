"""The training task (as open_clip's task objects): the model, the learnable CLIP temperature `logit_scale` and
the weighted loss terms: `task.loss(task.outputs(image_feats, text_feats, labels))` -> {"loss": total, term: value}."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import nn

from retrieval.errors import CXRError
from retrieval.losses import LossInputs, WeightedLoss, clamp_logit_scale_, initial_logit_scale
from retrieval.training.initial_model import tower_modules


class RetrievalTask(nn.Module):
    """Everything one optimiser step trains; `trainable_state()` is what a checkpoint holds."""

    def __init__(
        self,
        model: nn.Module,
        loss_weights: Mapping[str, float],
        positive_rule: str,
        supcon_temperature: float,
        learn_temperature: bool = True,
    ):
        super().__init__()
        self.model = model
        device = next(model.parameters()).device
        self.logit_scale = nn.Parameter(
            torch.tensor(initial_logit_scale(), device=device), requires_grad=learn_temperature
        )
        self.loss = WeightedLoss(loss_weights, positive_rule=positive_rule, supcon_temperature=supcon_temperature)

    def clamp_logit_scale_(self) -> None:
        """Keep the inverse temperature in [1, 100]; call after each optimiser step."""
        clamp_logit_scale_(self.logit_scale)

    def embed(self, image_feats: torch.Tensor, text_feats: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Pooled tower features -> L2-normalised (image, report) embeddings."""
        return self.model.project_images(image_feats), self.model.project_texts(text_feats)

    def outputs(self, image_feats: torch.Tensor, text_feats: torch.Tensor, labels: torch.Tensor) -> LossInputs:
        """The batch's embeddings (and abnormality logits when a loss term needs them) from its tower features;
        row i of each input is study i. Run it under the run's autocast; the loss then runs in fp32."""
        img, txt = self.embed(image_feats, text_feats)
        logits = None
        if self.loss.needs_abnormal_logits:
            logits = torch.cat([self.model.abnormal_logit(img), self.model.abnormal_logit(txt)])
        return LossInputs(img, txt, labels, self.logit_scale, logits)

    def trainable_state(self) -> dict[str, torch.Tensor]:
        """What training changes: trained parameters, all buffers (e.g. BatchNorm stats), `logit_scale`."""
        model = self.model
        keep = {n for n, p in model.named_parameters() if p.requires_grad} | {n for n, _ in model.named_buffers()}
        out = {f"model.{k}": v.detach().cpu().clone().contiguous() for k, v in model.state_dict().items() if k in keep}
        out["logit_scale"] = self.logit_scale.detach().cpu().clone().contiguous()
        return out

    def load_trainable_state(self, state: Mapping[str, torch.Tensor]) -> None:
        """Inverse of `trainable_state` (strict on the keys it holds)."""
        weights = {k[6:]: v for k, v in state.items() if k.startswith("model.")}
        missing = set(weights) - set(self.model.state_dict())
        if missing:
            raise CXRError(f"checkpoint holds weights the model lacks: {sorted(missing)[:3]}")
        if "logit_scale" not in state:
            raise CXRError("checkpoint holds no logit_scale")
        self.model.load_state_dict(weights, strict=False)
        with torch.no_grad():
            self.logit_scale.copy_(state["logit_scale"])

    def optimizer(
        self, scratch: Sequence[str], lr: float, tower_lr: float | None, weight_decay: float
    ) -> torch.optim.Optimizer:
        """AdamW over three groups: heads and `logit_scale` at `lr`; towers trained from scratch at `tower_lr`
        (default lr); unfrozen pretrained blocks at `tower_lr` (default lr/10)."""
        tower_of = {id(p): kind for kind, tower in tower_modules(self.model).items() for p in tower.parameters()}
        head, scratch_p, pretrained_p = [], [], []
        for p in self.model.parameters():
            if p.requires_grad:
                kind = tower_of.get(id(p))
                (head if kind is None else scratch_p if kind in scratch else pretrained_p).append(p)
        if self.logit_scale.requires_grad:
            head.append(self.logit_scale)
        groups = [{"params": head, "lr": lr}]
        if scratch_p:
            groups.append({"params": scratch_p, "lr": tower_lr or lr})
        if pretrained_p:
            groups.append({"params": pretrained_p, "lr": tower_lr or lr / 10})
        return torch.optim.AdamW(groups, weight_decay=weight_decay)
