"""The retrieval trainer's checkpoint content: an epoch's trained weights, optimiser and RNG state, the best
epoch's weights and the early-stopping state, committed through `retrieval.training_checkpoint.Checkpoint`."""

from __future__ import annotations

from typing import Any

import torch

from retrieval.errors import CXRError
from retrieval.training.task import RetrievalTask
from retrieval.training_checkpoint import Checkpoint


def save_epoch(
    checkpoint: Checkpoint, task: RetrievalTask, optimizer: torch.optim.Optimizer, state: dict, best_is_now: bool
) -> dict[str, Any]:
    """Commit the epoch `state["epoch"]`; `best` names this epoch's weights when it is the best so far, else
    the best epoch's (carried over). Returns the committed state."""
    from safetensors.torch import save_file

    name = f"epoch{state['epoch']:04d}"
    rng = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.stack(torch.cuda.get_rng_state_all())
    weights, extra = task.trainable_state(), {"optimizer": optimizer.state_dict(), "rng": rng}
    write = {
        "weights": (f"{name}.safetensors", lambda path: save_file(weights, str(path))),
        "optimizer": (f"{name}.optim.pt", lambda path: torch.save(extra, path)),
    }
    previous = checkpoint.path("best")
    keep = {"best": f"{name}.safetensors" if best_is_now or previous is None else previous.name}
    return checkpoint.commit({k: v for k, v in state.items() if k != "files"}, write, keep)


def fresh_state(key: str) -> dict[str, Any]:
    return {
        "key": key,
        "epoch": 0,
        "best_epoch": None,
        "best_metric": None,
        "bad_epochs": 0,
        "history": [],
        "stopped_early": False,
    }


def resume(
    checkpoint: Checkpoint, task: RetrievalTask, optimizer: torch.optim.Optimizer, key: str
) -> tuple[dict[str, Any], dict[str, torch.Tensor] | None]:
    """(state, best weights) of the committed checkpoint, its weights, optimiser and RNG state loaded; a fresh
    state and no best weights when there is none. A checkpoint of another run (`key`) is refused."""
    from safetensors.torch import load_file

    state = checkpoint.state(verify=True)
    if state is None:
        return fresh_state(key), None
    if state.get("key") != key:
        raise CXRError(
            f"{checkpoint.folder.parent}: holds a checkpoint of a different run (model, data or settings differ); "
            "use another --out or --fresh to start over"
        )
    try:
        weights = load_file(str(checkpoint.path("weights", state)))
        best = load_file(str(checkpoint.path("best", state)))
        extra = torch.load(checkpoint.path("optimizer", state), weights_only=True, map_location="cpu")
        task.load_trainable_state(weights)
        optimizer.load_state_dict(extra["optimizer"])
    except Exception as e:
        raise checkpoint.error(e) from None
    torch.set_rng_state(extra["rng"]["torch"])
    if "cuda" in extra["rng"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(list(extra["rng"]["cuda"]))
    return state, best
