"""Multi-task batch sampling: tasks drawn with probability proportional to 1 / (task dataset size) (seed 000,
PaliGemma-CXR), and LiteGPT's optional two-stage schedule (seed 001 section 3.2): grounded findings
(`[identify]`, plus `[ground]` when trained) first, then every task, diagnosis included.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

STAGE1_TASKS: tuple[str, ...] = ("identify", "ground")


def inverse_size_weights(sizes: Mapping[str, int]) -> dict[str, float]:
    """Task probabilities proportional to the inverse of each task's dataset size (empty tasks get 0)."""
    inv = {t: (1.0 / n if n > 0 else 0.0) for t, n in sizes.items()}
    total = sum(inv.values())
    if total == 0:
        raise ValueError("every task dataset is empty")
    return {t: v / total for t, v in inv.items()}


def stage_tasks(step: int, total_steps: int, tasks: Sequence[str], two_stage: bool, stage1_fraction: float) -> list:
    """The tasks active at `step`: stage 1 (grounded findings) for the first fraction of steps, then all."""
    if not two_stage:
        return list(tasks)
    first = [t for t in tasks if t in STAGE1_TASKS]
    if first and step < int(total_steps * stage1_fraction):
        return first
    return list(tasks)


class TaskSampler:
    """Draws batches of examples: a task by inverse-size weight, then an example of it uniformly.

    The random state is a numpy Generator whose state can be saved and restored (`state_dict`), so a resumed
    run draws the same batches as an uninterrupted one.
    """

    def __init__(self, datasets: Mapping[str, Sequence[Any]], seed: int = 0):
        self.datasets = {t: list(v) for t, v in datasets.items() if len(v)}
        if not self.datasets:
            raise ValueError("no examples to sample from")
        self.rng = np.random.default_rng(seed)

    def weights(self, tasks: Sequence[str] | None = None) -> dict[str, float]:
        """Inverse-size probabilities over `tasks` (default: all tasks with examples)."""
        tasks = [t for t in (tasks or self.datasets) if t in self.datasets]
        return inverse_size_weights({t: len(self.datasets[t]) for t in tasks})

    def sample(self, batch_size: int, tasks: Sequence[str] | None = None) -> list[Any]:
        """`batch_size` examples, each from a task drawn by inverse-size weight among `tasks`."""
        w = self.weights(tasks)
        names = list(w)
        picks = self.rng.choice(len(names), size=batch_size, p=np.array([w[t] for t in names]))
        out = []
        for i in picks:
            data = self.datasets[names[i]]
            out.append(data[int(self.rng.integers(len(data)))])
        return out

    def state_dict(self) -> dict:
        """The generator's state (JSON-serialisable) for checkpoints."""
        return self.rng.bit_generator.state

    def load_state_dict(self, state: dict) -> None:
        """Restore a state saved by `state_dict`."""
        self.rng.bit_generator.state = state
