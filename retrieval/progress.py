"""One look for every progress bar in the project (rich), with a rate column in the caller's unit."""

from __future__ import annotations

import sys
from collections.abc import Iterable, Iterator
from typing import TypeVar

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    Task,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.text import Text

T = TypeVar("T")

# Progress goes to stderr so that `--json` output on stdout stays clean for scripts.
console = Console(stderr=True)


class RateColumn(ProgressColumn):
    """Items per second, labelled with the task's unit (images/s, studies/s ...)."""

    def render(self, task: Task) -> Text:
        unit = task.fields.get("unit", "it")
        speed = task.finished_speed or task.speed
        return Text("" if speed is None else f"{speed:,.1f} {unit}/s", style="progress.data.speed")


def make_progress(disable: bool = False, transient: bool = False) -> Progress:
    """A rich Progress with description, bar, M/N, rate, elapsed and remaining time."""
    return Progress(
        TextColumn("[progress.description]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        RateColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console,
        disable=disable or not sys.stderr,
        transient=transient,
    )


def track(
    items: Iterable[T],
    description: str,
    total: int | None = None,
    unit: str = "it",
    disable: bool = False,
) -> Iterator[T]:
    """Iterate with a progress bar (like rich.progress.track, with the project's columns)."""
    if total is None and hasattr(items, "__len__"):
        total = len(items)  # type: ignore[arg-type]
    with make_progress(disable=disable) as progress:
        task = progress.add_task(description, total=total, unit=unit)
        for item in items:
            yield item
            progress.advance(task)
