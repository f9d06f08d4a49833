"""``lorasoup.resources``: step rates and peak GPU memory for ``run.json``, checked with fakes on the CPU."""

from __future__ import annotations

import pytest
import torch

from lorasoup.resources import GIB, StepClock, resource_record


class FakeClock:
    def __init__(self, times: list[float]) -> None:
        self.times = iter(times)

    def __call__(self) -> float:
        return next(self.times)


def test_step_clock_rates_overall_and_past_the_first_steps() -> None:
    # start at 0, then ten steps: the first takes 5 s (warm-up), the others 1 s each.
    ends = [5.0 + i for i in range(10)]
    synced: list[int] = []
    clock = StepClock(10, synchronize=lambda: synced.append(1), clock=FakeClock([0.0, *ends]))
    clock.start()
    for step in range(1, 11):
        clock.tick(step)
    rates = clock.rates()
    assert rates["steady_from_step"] == 2  # a fifth of 10 steps
    assert rates["steps_per_s"] == pytest.approx(10 / 14)
    assert rates["steady_steps_per_s"] == pytest.approx(1.0)  # steps 3..10 over ends[1]..ends[9]
    assert len(synced) == 2  # only at the two steps that bound the steady window


def test_step_clock_after_a_resume_counts_only_the_new_steps() -> None:
    clock = StepClock(20, first_step=15, clock=FakeClock([0.0, 1.0, 2.0, 3.0, 4.0, 5.0]))
    clock.start()
    for step in range(16, 21):
        clock.tick(step)
    rates = clock.rates()
    assert rates["steady_from_step"] == 16
    assert rates["steps_per_s"] == pytest.approx(1.0)
    assert rates["steady_steps_per_s"] == pytest.approx(1.0)


def test_step_clock_with_one_step_has_no_steady_rate() -> None:
    clock = StepClock(1, clock=FakeClock([0.0, 2.0]))
    clock.start()
    clock.tick(1)
    assert clock.rates() == {
        "steps_per_s": 0.5,
        "steady_steps_per_s": None,
        "steady_from_step": 1,
        "step_seconds": [2.0],
        "steady_step_seconds_median": None,
    }


def test_step_clock_times_each_step_and_takes_the_median_of_the_steady_ones() -> None:
    # start at 0; step 1 ends at 5 (compile), then steps of 1, 1, 3 (a stall), 1, 1, 1, 1, 1, 1 s.
    ends = [5.0, 6.0, 7.0, 10.0, 11.0, 12.0, 13.0, 14.0, 15.0, 16.0]
    clock = StepClock(10, clock=FakeClock([0.0, *ends]))
    clock.start()
    for step in range(1, 11):
        clock.tick(step)
    rates = clock.rates()
    assert rates["step_seconds"] == [5.0, 1.0, 1.0, 3.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0]
    assert rates["steady_step_seconds_median"] == 1.0  # steps 3..10: the stall moves the mean, not this
    assert rates["steady_steps_per_s"] == pytest.approx(8 / 10)


def test_step_clock_after_a_resume_times_the_first_new_step_from_the_start() -> None:
    clock = StepClock(20, first_step=15, clock=FakeClock([10.0, 12.0, 13.0, 14.5]))
    clock.start()
    for step in (16, 17, 18):
        clock.tick(step)
    assert clock.step_seconds() == {16: 2.0, 17: 1.0, 18: 1.5}
    assert clock.rates()["steady_step_seconds_median"] == 1.25  # steps 17 and 18


def test_resource_record_on_the_cpu_has_no_memory_and_gathers_nothing() -> None:
    def refuse(value: float) -> list[float]:
        raise AssertionError("nothing to gather on the CPU")

    record = resource_record(torch.device("cpu"), all_gather=refuse)
    assert record == {
        "num_processes": 1,
        "device": "cpu",
        "peak_gpu_memory_gib": None,
        "peak_gpu_memory_gib_per_process": None,
    }


class FakeCuda:
    def max_memory_allocated(self, device: torch.device) -> int:
        return 3 * GIB

    def get_device_name(self, device: torch.device) -> str:
        return "Fake GPU"


def test_resource_record_on_a_gpu_takes_the_largest_process() -> None:
    def gather(value: float) -> list[float]:  # this process is rank 0 of two; rank 1 peaked higher
        return [value, 5.5]

    record = resource_record(torch.device("cuda", 0), cuda=FakeCuda(), all_gather=gather)
    assert record["peak_gpu_memory_gib"] == 5.5
    assert record["peak_gpu_memory_gib_per_process"] == [3.0, 5.5]
    assert record["gpu"] == "Fake GPU" and record["device"] == "cuda"
