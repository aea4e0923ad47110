"""The model a run starts from: built under its seeds, towers frozen, unfrozen or trained from scratch."""

from __future__ import annotations

import copy
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from retrieval.errors import CXRError

# A pristine copy of the last freshly built model, so repeated runs in one process (ablations, tests) skip the
# slow tower construction; copies are deep, so training never touches it.
_PRISTINE: dict[tuple[str, int, str], nn.Module] = {}


def build_model(model_name: str, tower_seed: int, seed: int, device: torch.device) -> nn.Module:
    """The model with towers built under `tower_seed` and, for a fresh model, projector heads initialised under
    `seed` (a saved folder keeps its trained heads)."""
    from retrieval.models import ProjectorHeads, load_model

    saved = Path(str(model_name)).is_dir()
    key = (model_name, tower_seed, str(device))
    if not saved and key in _PRISTINE:
        model = copy.deepcopy(_PRISTINE[key])
    else:
        torch.manual_seed(tower_seed)
        model = load_model(model_name, device=device)
        if not saved:
            _PRISTINE.clear()  # keep one pristine copy per process
            _PRISTINE[key] = copy.deepcopy(model)
    if not saved:
        torch.manual_seed(seed)
        model.projector = ProjectorHeads(model.projector.cfg).to(device)
    return model


def scratch_towers(model: nn.Module, image_tower: str) -> list[str]:
    """The towers trained from scratch: `image_tower` train | frozen, or auto (what the model says; cxr-tiny)."""
    if image_tower != "auto":
        return ["image"] if image_tower == "train" else []
    return ["image"] if getattr(model, "trains_image_tower", False) else []


def tower_modules(model: nn.Module) -> dict[str, nn.Module]:
    """{"image": ..., "text": ...}: the model's towers (everything else — projectors, head — always trains)."""
    towers = getattr(model, "towers", None)
    if not callable(towers):
        raise CXRError(f"model {type(model).__name__} does not expose its towers (CXRModel.towers())")
    return dict(towers())


def set_trainable(
    model: nn.Module, scratch: Sequence[str], unfreeze_last: int, unfreeze: Sequence[str] = ("image", "text")
) -> dict[str, str]:
    """Freeze the pretrained towers except the last `unfreeze_last` blocks and head of those named in `unfreeze`
    (`CXRModel.unfreeze_last`, the stem stays frozen); towers named in `scratch` train fully; projectors and head
    always train. Returns {tower: "frozen" | "trained (from scratch)" | "last N blocks"}."""
    pretrained = [k for k in ("image", "text") if k not in scratch and k in unfreeze]
    counts = model.unfreeze_last(unfreeze_last, towers=pretrained) if pretrained else {}
    if not pretrained:
        model.freeze_towers()
    status = {}
    for kind, tower in tower_modules(model).items():
        if kind in scratch:
            tower.requires_grad_(True)
            status[kind] = "trained (from scratch)"
        elif counts.get(kind):
            status[kind] = f"last {counts[kind]} blocks"
        else:
            status[kind] = "frozen"
    return status


def tower_frozen(tower: nn.Module) -> bool:
    """True when no parameter of the tower is trained."""
    return not any(p.requires_grad for p in tower.parameters())


def set_train_modes(model: nn.Module) -> None:
    """eval() everywhere (frozen towers: no dropout, fixed BN), train() on modules whose weights all train."""
    model.eval()
    for mod in model.modules():
        params = list(mod.parameters(recurse=True))
        if params and all(p.requires_grad for p in params):
            mod.train()
