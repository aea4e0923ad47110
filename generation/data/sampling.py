"""Multi-task batch sampling: which task a batch example comes from, and which example of that task.

Task rules (`task_rule`):
- `uniform` (default): every task equally often. No task starves whatever its size.
- `inverse`: p ∝ 1 / (task dataset size), seed 000 (PaliGemma-CXR). Kept for comparison: on the demo corpus
  it gives the largest task (`[ground]`, thousands of anatomy examples) 2 % of the batches.
- `proportional`: p ∝ size (plain concatenation of the task datasets).

Example rule within a task (`balance`, a power alpha in [0, 1]): an example is drawn with weight
`freq(key)^-alpha`, where `key` is its rarest finding (or `No Finding`). `0` is uniform; `1` draws every finding
(and normal) equally often; in between softens the majority. This is how abnormal studies and rare findings
are re-sampled, so the model does not collapse to the majority answer.

LiteGPT's optional two-stage schedule (seed 001 section 3.2): grounded findings (`[identify]`, plus `[ground]`)
first, then every task.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

STAGE1_TASKS: tuple[str, ...] = ("identify", "ground")
TASK_RULES: tuple[str, ...] = ("uniform", "inverse", "proportional")


def inverse_size_weights(sizes: Mapping[str, int]) -> dict[str, float]:
    """Task probabilities proportional to the inverse of each task's dataset size (empty tasks get 0)."""
    return task_weights(sizes, "inverse")


def task_weights(sizes: Mapping[str, int], rule: str = "uniform") -> dict[str, float]:
    """Task probabilities under `rule` (see the module docstring); tasks without examples get 0."""
    if rule not in TASK_RULES:
        raise ValueError(f"unknown task rule {rule!r}; choose from {TASK_RULES}")
    raw = {
        t: (0.0 if n <= 0 else {"uniform": 1.0, "inverse": 1.0 / n, "proportional": float(n)}[rule])
        for t, n in sizes.items()
    }
    total = sum(raw.values())
    if total == 0:
        raise ValueError("every task dataset is empty")
    return {t: v / total for t, v in raw.items()}


def balance_weights(keys: Sequence[str], alpha: float) -> np.ndarray:
    """Per-example draw probabilities ∝ freq(key)^-alpha (normalised to sum 1)."""
    if not len(keys):
        return np.zeros(0)
    counts = Counter(keys)
    w = np.array([counts[k] ** -float(alpha) for k in keys], dtype=np.float64)
    return w / w.sum()


def stage_tasks(step: int, total_steps: int, tasks: Sequence[str], two_stage: bool, stage1_fraction: float) -> list:
    """The tasks active at `step`: stage 1 (grounded findings) for the first fraction of steps, then all."""
    if not two_stage:
        return list(tasks)
    first = [t for t in tasks if t in STAGE1_TASKS]
    if first and step < int(total_steps * stage1_fraction):
        return first
    return list(tasks)


class TaskSampler:
    """Draws batches of examples: a task by `task_rule`, then an example of it by the `balance` weights.

    `keys(example) -> str` names an example's balancing class (default: every example its own class's
    member, i.e. uniform). The random state is a numpy Generator whose state can be saved and restored
    (`state_dict`), so a resumed run draws the same batches as an uninterrupted one.
    """

    def __init__(
        self,
        datasets: Mapping[str, Sequence[Any]],
        seed: int = 0,
        task_rule: str = "inverse",
        balance: float = 0.0,
        keys: Any = None,
    ):
        self.datasets = {t: list(v) for t, v in datasets.items() if len(v)}
        if not self.datasets:
            raise ValueError("no examples to sample from")
        if task_rule not in TASK_RULES:
            raise ValueError(f"unknown task rule {task_rule!r}; choose from {TASK_RULES}")
        self.task_rule = task_rule
        self.rng = np.random.default_rng(seed)
        self.example_p: dict[str, np.ndarray | None] = {}
        for t, data in self.datasets.items():
            if balance > 0 and keys is not None:
                self.example_p[t] = balance_weights([keys(x) for x in data], balance)
            else:
                self.example_p[t] = None

    def weights(self, tasks: Sequence[str] | None = None) -> dict[str, float]:
        """Task probabilities over `tasks` (default: all tasks with examples)."""
        tasks = [t for t in (tasks or self.datasets) if t in self.datasets]
        return task_weights({t: len(self.datasets[t]) for t in tasks}, self.task_rule)

    def sample(self, batch_size: int, tasks: Sequence[str] | None = None) -> list[Any]:
        """`batch_size` examples, each from a task drawn by the task rule among `tasks`."""
        w = self.weights(tasks)
        names = list(w)
        picks = self.rng.choice(len(names), size=batch_size, p=np.array([w[t] for t in names]))
        out = []
        for i in picks:
            data, p = self.datasets[names[i]], self.example_p[names[i]]
            j = int(self.rng.integers(len(data))) if p is None else int(self.rng.choice(len(data), p=p))
            out.append(data[j])
        return out

    def state_dict(self) -> dict:
        """The generator's state (JSON-serialisable) for checkpoints."""
        return self.rng.bit_generator.state

    def load_state_dict(self, state: dict) -> None:
        """Restore a state saved by `state_dict`."""
        self.rng.bit_generator.state = state
