"""Live progress for the CLI: one bar builder, adapted to each shape of library callback.

Library functions report through plain callbacks — ``(step, total, loss)`` while training,
``(done, total)`` over modules or batches, ``(what, done, total)`` over a study's stages,
``(done, total, accuracy)`` while scoring — and never draw anything themselves. Each adapter below
turns one shape into updates of the bar that :func:`bar` builds, so how progress looks is decided in
one place: a plain one-line-per-stage mode for output that is not a terminal belongs in ``bar`` (and
``spinner``) alone.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)


@dataclass(frozen=True)
class Readout:
    """A number shown after the count, e.g. ``loss 0.4213``: a field name and its format spec."""

    name: str
    spec: str


@dataclass
class Bar:
    """One running bar: ``update`` moves it, ``finish`` marks it done under a final description."""

    progress: Progress
    task: TaskID

    def update(self, completed: int, total: int, **fields: Any) -> None:
        self.progress.update(self.task, completed=completed, total=total, **fields)

    def finish(self, description: str) -> None:
        total = self.progress.tasks[0].total
        self.progress.update(self.task, description=description, completed=total)


@contextmanager
def bar(
    console: Console, description: str, *, readout: Readout | None = None, remaining: bool = True
) -> Iterator[Bar]:
    """The CLI's progress bar: description, bar, done/total, an optional readout, elapsed, remaining."""
    columns: list[ProgressColumn] = [
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
    ]
    fields = {}
    if readout is not None:
        columns.append(TextColumn(f"{readout.name} {{task.fields[{readout.name}]:{readout.spec}}}"))
        fields[readout.name] = float("nan")
    columns.append(TimeElapsedColumn())
    if remaining:
        columns.append(TimeRemainingColumn())
    with Progress(*columns, console=console, transient=False) as progress:
        yield Bar(progress, progress.add_task(description, total=None, **fields))


def spinner(console: Console, description: str) -> AbstractContextManager[Any]:
    """For work with no count to show; ``.update(text)`` on the result changes the line."""
    return console.status(description)


@contextmanager
def step_progress(console: Console, description: str) -> Iterator[Callable[[int, int, float], None]]:
    """Training: ``(step, total, loss)``."""
    with bar(console, description, readout=Readout("loss", ".4f")) as live:
        yield lambda step, total, loss: live.update(step, total, loss=loss)


@contextmanager
def count_progress(console: Console, description: str) -> Iterator[Callable[[int, int], None]]:
    """Modules, batches, examples: ``(done, total)``."""
    with bar(console, description) as live:
        yield live.update


@contextmanager
def score_progress(console: Console, description: str) -> Iterator[Callable[[int, int, float], None]]:
    """Evaluation: ``(done, total, accuracy so far)``."""
    with bar(console, description, readout=Readout("accuracy", ".3f")) as live:
        yield lambda done, total, accuracy: live.update(done, total, accuracy=accuracy)


@contextmanager
def stage_progress(console: Console, description: str) -> Iterator[Callable[[str, int, int], None]]:
    """A study's stages: ``(what is running, done, total)``; the bar ends as "DESCRIPTION: done"."""
    with bar(console, description, remaining=False) as live:
        yield lambda what, done, total: live.update(done, total, description=what)
        live.finish(f"{description}: done")
