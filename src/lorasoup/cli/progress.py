"""Live progress for the CLI: one bar builder, adapted to each shape of library callback.

Library functions report through plain callbacks — ``(step, total, loss)`` while training,
``(done, total)`` over modules or batches, ``(what, done, total)`` over a study's stages,
``(done, total, accuracy)`` while scoring — and never draw anything themselves. Each adapter below
turns one shape into updates of the bar that :func:`bar` builds, so how progress looks is decided in
one place: where the console is not a terminal (a log file, a pipe) ``bar`` and ``spinner`` print one
plain, flushed line per stage instead of redrawing a bar that a log would only see at the end.
"""

from __future__ import annotations

import datetime
import time
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
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)


@dataclass(frozen=True)
class Readout:
    """A number shown after the count, e.g. ``loss 0.4213``: a field name and its format spec."""

    name: str
    spec: str


class Bar:
    """One running bar on a terminal: ``update`` moves it, ``finish`` marks it done under a final
    description. Drawn from the first update on, so a command that fails before any work (a bad
    adapter, a bad config) prints its error alone, not a "0/? loss nan" bar above it."""

    def __init__(self, console: Console, columns: list[ProgressColumn], description: str, **fields: Any):
        self.progress = Progress(*columns, console=console, transient=False)
        self.task = self.progress.add_task(description, total=None, **fields)
        self.started = False

    def update(self, completed: int, total: int, **fields: Any) -> None:
        if not self.started:
            self.progress.start()
            self.started = True
        self.progress.update(self.task, completed=completed, total=total, **fields)

    def finish(self, description: str) -> None:
        total = self.progress.tasks[0].total
        self.update(total or 0, total or 0, description=description)

    def close(self) -> None:
        if self.started:
            self.progress.stop()


class PlainBar:
    """The bar for output that is not a terminal (a log file, a pipe): plain lines, each flushed at
    once, so a redirected log follows the run. One line when a stage starts (a new description) and one
    when the bar ends; nothing for a run that fails before its first update."""

    def __init__(self, console: Console, description: str, readout: Readout | None):
        self.console, self.description, self.readout = console, description, readout
        self.completed, self.total, self.fields = 0, 0, {}
        self.started = time.monotonic()
        self.updated = False

    def _line(self, text: str) -> None:
        elapsed = datetime.timedelta(seconds=round(time.monotonic() - self.started))
        self.console.print(f"{text} [{elapsed}]", markup=False, highlight=False, soft_wrap=True)
        self.console.file.flush()

    def update(self, completed: int, total: int, **fields: Any) -> None:
        description = fields.pop("description", None)
        if description is not None and description != self.description:
            self.description = description
            self._line(f"{description} ({completed}/{total})")
        self.completed, self.total, self.updated = completed, total, True
        self.fields.update(fields)

    def finish(self, description: str) -> None:
        self.description, self.completed, self.updated = description, self.total, True

    def close(self) -> None:
        if not self.updated:
            return
        value = self.fields.get(self.readout.name) if self.readout else None
        shown = (
            f" {self.readout.name} {value:{self.readout.spec}}" if self.readout and value is not None else ""
        )
        self._line(f"{self.description}: {self.completed}/{self.total}{shown}")


@contextmanager
def bar(
    console: Console, description: str, *, readout: Readout | None = None, remaining: bool = True
) -> Iterator[Bar | PlainBar]:
    """The CLI's progress bar: description, bar, done/total, an optional readout, elapsed, remaining;
    plain lines (``PlainBar``) where the console is not a terminal. The closing line is printed only
    when the work ends without an error."""
    if not console.is_terminal:
        plain = PlainBar(console, description, readout)
        yield plain
        plain.close()
        return
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
    live = Bar(console, columns, description, **fields)
    try:
        yield live
    finally:
        live.close()


class _PlainStatus:
    """``console.status`` for output that is not a terminal: each ``update`` is one plain, flushed line
    (the opening description is not printed, so an error before any work stands alone)."""

    def __init__(self, console: Console, description: str):
        self.console = console

    def update(self, text: str) -> None:
        self.console.print(text, markup=False, highlight=False, soft_wrap=True)
        self.console.file.flush()

    def __enter__(self) -> _PlainStatus:
        return self

    def __exit__(self, *exc: object) -> None:
        return None


def spinner(console: Console, description: str) -> AbstractContextManager[Any]:
    """For work with no count to show; ``.update(text)`` on the result changes the line (a new plain
    line where the console is not a terminal)."""
    if not console.is_terminal:
        return _PlainStatus(console, description)
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
