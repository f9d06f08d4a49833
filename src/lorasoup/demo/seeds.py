"""Running a study's seeds: one after another, or several at once in worker processes (``jobs``).

A *unit* is one seed of one study (``run(seed folder, seed, settings, stage)``, e.g.
:func:`lorasoup.demo.study.run_seed`). :func:`run_units` runs a list of them, in this process one
after another (``jobs=1``), or ``jobs`` at a time in worker processes: the seeds of one demo, or
every seed of every model size of a scaling study (``scale.py``).

Why processes: on a GPU the demo's small models leave the card mostly idle (a step costs more in
Python and kernel launches than in arithmetic), so seeds run side by side fill it, and the CPU
cores, better than one after another. Each worker is a fresh interpreter (``spawn``, which CUDA
needs) that runs its unit exactly as the sequential loop would, in its own folder; every random draw
of a seed is seeded from the seed, so where it runs does not change its numbers on the CPU
(tests/demo/test_scale.py). A worker takes the caller's torch thread count, transformers verbosity
and warning filters, and sends its progress back through a queue.
"""

from __future__ import annotations

import multiprocessing
import queue as queue_module
import warnings
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lorasoup.demo.real_study import SeedRunner
from lorasoup.demo.settings import MethodResult, StageHook

Outcome = tuple[list[MethodResult], dict[str, Any]]
"""A seed's rows and facts, as ``run_seed`` returns them."""


@dataclass(frozen=True)
class Unit:
    """One seed to run: ``run_one(folder, seed, settings, stage)``, which reports ``stages`` steps.

    ``label`` prefixes its progress lines (``seed 3``, ``25M seed 3``). With ``jobs > 1`` everything
    here must pickle (``run_one``: a module-level function or a ``functools.partial`` of one).
    """

    run_one: SeedRunner
    folder: Path
    seed: int
    settings: Any
    stages: int
    label: str


def run_units(
    units: Sequence[Unit],
    *,
    jobs: int = 1,
    stage: StageHook | None = None,
    on_done: Callable[[int, Outcome], None] | None = None,
    resume: bool = False,
) -> list[Outcome]:
    """Run every unit (its folder is created here; with ``resume`` it may exist from a run that was
    stopped), ``jobs`` at a time; outcomes in the units' order.

    ``stage`` sees ``("<label>: what", done, total)`` summed over all units; ``on_done(index,
    outcome)`` is called in this process as each unit finishes. A failing unit (or an interrupt)
    stops the run: the units not started are cancelled, the running ones ended, the error raised.
    """
    for unit in units:
        unit.folder.mkdir(parents=True, exist_ok=resume)
    progress = _Progress(units, stage)
    if jobs <= 1 or len(units) == 1:
        outcomes = []
        for index, unit in enumerate(units):
            outcome = unit.run_one(unit.folder, unit.seed, unit.settings, progress.hook(index))
            if on_done is not None:
                on_done(index, outcome)
            outcomes.append(outcome)
        return outcomes
    return _in_processes(units, min(jobs, len(units)), progress, on_done)


class _Progress:
    """Sums the units' ``(what, done, total)`` reports into one ``stage`` line."""

    def __init__(self, units: Sequence[Unit], stage: StageHook | None) -> None:
        self.units, self.stage = units, stage
        self.done = [0] * len(units)
        self.total = sum(unit.stages for unit in units)

    def report(self, index: int, what: str, done: int) -> None:
        self.done[index] = done
        if self.stage is not None:
            self.stage(f"{self.units[index].label}: {what}", sum(self.done), self.total)

    def hook(self, index: int) -> StageHook:
        return lambda what, done, _total: self.report(index, what, done)


def _in_processes(
    units: Sequence[Unit], jobs: int, progress: _Progress, on_done: Callable[[int, Outcome], None] | None
) -> list[Outcome]:
    context = multiprocessing.get_context("spawn")
    messages = context.Queue()  # handed to each worker when it starts (a queue cannot travel in a task)
    outcomes: dict[int, Outcome] = {}
    pool = ProcessPoolExecutor(
        max_workers=jobs, mp_context=context, initializer=_start_worker, initargs=(messages, _caller_state())
    )
    try:
        futures: dict[Future[Outcome], int] = {
            pool.submit(_worker, unit, index): index for index, unit in enumerate(units)
        }
        pending = set(futures)
        while pending:
            finished, pending = wait(pending, timeout=0.5, return_when=FIRST_COMPLETED)
            _forward(messages, progress)
            for future in sorted(finished, key=futures.__getitem__):
                index = futures[future]
                outcomes[index] = future.result()  # a worker's error is raised here
                if on_done is not None:
                    on_done(index, outcomes[index])
        _forward(messages, progress)
    except BaseException:
        _stop(pool)  # an error, or an interrupt (a time limit): the other units stop too
        raise
    finally:
        pool.shutdown(wait=True)
        messages.close()
    return [outcomes[index] for index in range(len(units))]


def _stop(pool: ProcessPoolExecutor) -> None:
    """Cancel the units not started and end the running ones now (not when they finish), so that
    no worker writes into a folder the caller is about to remove."""
    processes = list((getattr(pool, "_processes", None) or {}).values())  # shutdown forgets them
    if not processes and hasattr(pool, "terminate_workers"):  # Python 3.14 has it public
        pool.terminate_workers()
        return
    pool.shutdown(wait=False, cancel_futures=True)
    for process in processes:
        process.terminate()
    for process in processes:
        process.join()


def _forward(messages: Any, progress: _Progress) -> None:
    """Hand the workers' progress messages ``(index, what, done)`` on."""
    while True:
        try:
            index, what, done = messages.get_nowait()
        except queue_module.Empty:
            return
        progress.report(index, what, done)


def _caller_state() -> dict[str, Any]:
    """What a worker copies from the caller: torch threads, transformers' verbosity and bars, warnings."""
    from transformers.utils import logging as hf_logging

    return {
        "threads": torch.get_num_threads(),
        "hf_verbosity": hf_logging.get_verbosity(),
        "hf_bars": hf_logging.is_progress_bar_enabled(),
        "warnings": [entry for entry in warnings.filters if _picklable(entry)],
    }


def _picklable(value: Any) -> bool:
    import pickle

    try:
        pickle.dumps(value)
    except Exception:  # a filter on a class defined in a function, say: the worker goes without it
        return False
    return True


_MESSAGES: Any = None
"""In a worker process: the queue its progress goes back through (set by :func:`_start_worker`)."""


def _start_worker(messages: Any, state: dict[str, Any]) -> None:
    """A worker process starts: the caller's settings (:func:`_caller_state`) and the progress queue."""
    from transformers.utils import logging as hf_logging

    global _MESSAGES
    _MESSAGES = messages
    torch.set_num_threads(state["threads"])
    hf_logging.set_verbosity(state["hf_verbosity"])
    if not state["hf_bars"]:
        hf_logging.disable_progress_bar()
    warnings.filters[:] = state["warnings"]


def _worker(unit: Unit, index: int) -> Outcome:
    """One unit in a worker process."""

    def hook(what: str, done: int, total: int) -> None:
        _MESSAGES.put((index, what, done))

    return unit.run_one(unit.folder, unit.seed, unit.settings, hook)
