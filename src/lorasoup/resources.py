"""What a training run cost: its step rate, its processes and its peak GPU memory, for ``run.json``.

Both ``lorasoup train`` and ``lorasoup cat`` record them, so runs on one GPU and on several (DDP, FSDP
through ``accelerate launch``) can be compared from their artifacts alone (``bench/multi_gpu_train.py``).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any

import torch

GIB = 1024**3


class StepClock:
    """Wall time at the end of each optimizer step: steps/s over the whole run and past its first steps.

    The first steps pay for CUDA start-up, allocator growth and kernel selection, so the steady rate
    leaves out the first fifth of the run (at least one step). ``synchronize`` (``torch.cuda.synchronize``
    on a GPU) waits for queued device work at the two steps whose times bound the steady window, and at
    no other: the host clock then reads when the GPU finished, at the cost of two stalls per run.

    Each step's own time is the host time between the ends of two consecutive steps. It is the step's
    device time only where the loop waits for the GPU once a step: ``lorasoup cat`` (and ``moe``) read
    the loss every step; the Trainer (``lorasoup train``) reads it on logging steps only, so there set
    ``train.logging_steps: 1``, or the host may queue steps ahead and single steps' times spread. The
    steady rate is exact either way.
    """

    def __init__(
        self,
        total_steps: int,
        *,
        first_step: int = 0,
        synchronize: Callable[[], None] | None = None,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        self.first_step, self.total_steps = first_step, total_steps
        self.steady_from = min(total_steps, first_step + max(1, (total_steps - first_step) // 5))
        self.synchronize, self.clock = synchronize, clock
        self.started: float | None = None
        self.ends: dict[int, float] = {}

    def start(self) -> None:
        self.started = self.clock()

    def tick(self, step: int) -> None:
        """Record the end of optimizer step ``step`` (1-based, as the Trainer counts)."""
        if self.synchronize is not None and step in (self.steady_from, self.total_steps):
            self.synchronize()
        self.ends[step] = self.clock()

    def step_seconds(self) -> dict[int, float]:
        """``{step: seconds}``: the time from the previous step's end (from ``start`` for the first
        step) to this one's, for every step whose previous end was recorded."""
        previous = {**self.ends, self.first_step: self.started}
        return {
            step: end - previous[step - 1]
            for step, end in sorted(self.ends.items())
            if previous.get(step - 1) is not None
        }

    def rates(self) -> dict[str, Any]:
        """``steps_per_s`` (from ``start``), ``steady_steps_per_s`` (after ``steady_from``), or None;
        ``step_seconds`` (each step's time, in step order from ``first_step + 1``) and
        ``steady_step_seconds_median`` (the median over the steady steps, or None)."""
        last = max(self.ends, default=None)
        overall = steady = None
        if last is not None and self.started is not None and self.ends[last] > self.started:
            overall = (last - self.first_step) / (self.ends[last] - self.started)
        if last is not None and last > self.steady_from and self.steady_from in self.ends:
            steady = (last - self.steady_from) / (self.ends[last] - self.ends[self.steady_from])
        seconds = self.step_seconds()
        steady_seconds = [value for step, value in seconds.items() if step > self.steady_from]
        return {
            "steps_per_s": overall,
            "steady_steps_per_s": steady,
            "steady_from_step": self.steady_from,
            "step_seconds": [round(value, 6) for value in seconds.values()],
            "steady_step_seconds_median": statistics.median(steady_seconds) if steady_seconds else None,
        }


def synchronizer(device: torch.device) -> Callable[[], None] | None:
    """``torch.cuda.synchronize`` of ``device`` when it is a GPU; None (nothing to wait for) otherwise."""
    if device.type != "cuda":
        return None
    return lambda: torch.cuda.synchronize(device)


def num_processes() -> int:
    """Processes in the run: the ``torch.distributed`` world size when initialised, else 1."""
    dist = torch.distributed
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _all_gather_float(value: float) -> list[float]:
    """``value`` of every process, in rank order (one tiny collective; every process must call it)."""
    if num_processes() == 1:
        return [value]
    gathered: list[Any] = [None] * num_processes()
    torch.distributed.all_gather_object(gathered, value)
    return [float(v) for v in gathered]


def resource_record(
    device: torch.device,
    *,
    cuda: Any = torch.cuda,
    all_gather: Callable[[float], list[float]] = _all_gather_float,
) -> dict[str, Any]:
    """Processes and peak GPU memory (``max_memory_allocated``, GiB) of the run, for ``run.json``.

    On a GPU, every process of a distributed run must call this (the values are gathered), and
    ``peak_gpu_memory_gib`` is the largest over processes, one process per GPU: the memory a GPU needs.
    On the CPU nothing is gathered and the memory keys are None. ``cuda`` and ``all_gather`` are
    seams for tests.
    """
    record: dict[str, Any] = {
        "num_processes": num_processes(),
        "device": device.type,
        "peak_gpu_memory_gib": None,
        "peak_gpu_memory_gib_per_process": None,
    }
    if device.type != "cuda":
        return record
    per_process = all_gather(cuda.max_memory_allocated(device) / GIB)
    record["peak_gpu_memory_gib"] = max(per_process)
    record["peak_gpu_memory_gib_per_process"] = per_process
    record["gpu"] = cuda.get_device_name(device)
    return record
