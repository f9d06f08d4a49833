"""The demo's settings, its tasks' names and its result rows: what every other demo module shares.

``DemoSettings`` holds everything the study's numbers depend on; ``MethodResult`` is one row of the
table; :func:`aggregate` averages rows over seeds.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

from lorasoup.demo.base import BaseModelSize
from lorasoup.demo.benchmark import BenchmarkSizes
from lorasoup.demo.device import check_device
from lorasoup.demo.robustness import check_frames

StageHook = Callable[[str, int, int], None]
"""``(what is running, stages done, stages in all)``."""

TASKS = ("composite", "math", "code")
TASKS_K3 = ("composite3", "math", "code", "extra")
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@dataclass(frozen=True)
class DemoSettings:
    """Everything the study's numbers depend on; the GPU study scales ``base`` and the step counts."""

    base: BaseModelSize = field(default_factory=BaseModelSize)
    sizes: BenchmarkSizes = field(default_factory=BenchmarkSizes)
    lora_rank: int = 8
    lora_steps: int = 400
    lora_learning_rate: float = 3e-3
    batch_size: int = 32
    cat_steps: int = 300
    cat_learning_rate: float = 0.1
    density: float = 0.75  # TIES and DARE, as the paper's code
    search_examples: int = 8
    search_population: int = 16
    search_iterations: int = 15
    eval_batch_size: int = 100
    # true: pre-training and LoRA batches of rows of similar length (transformers' LengthGroupedSampler),
    # a quarter less padding. Off by default: it moved the study's outcomes (docs/demo.md: with it no
    # merge composed in three seeds; with random batches DARE and TSV-Merge compose in two of three)
    # for a speed-up lost in this VM's run-to-run noise.
    group_by_length: bool = False
    skills: int = 2  # 3: the extra skill joins, and the study runs again at K = 3 (benchmark.py)
    format_robust: bool = False  # the format-robustness rows (robustness.py)
    extra_rows: bool = False  # the costly rows: CAT and LoRA-Flow gates on the k target examples (compose.py)
    train_formats: list[str] = field(default_factory=lambda: ["plain", "fmt1", "fmt2", "fmt4"])
    held_out_formats: list[str] = field(default_factory=lambda: ["fmt7", "fmt8", "fmt10"])
    device: str = "auto"  # auto (CUDA if torch sees a GPU, else the CPU) | cpu | cuda; device.py

    def validate(self) -> None:
        from lorasoup.config import require

        require(self.skills in (2, 3), f"skills: the demo has 2 or 3 skills, not {self.skills}")
        check_frames(self.train_formats, self.held_out_formats)
        check_device(self.device)


@dataclass
class MethodResult:
    """One row of the table: accuracy on each task, the artifact it came from, and how it was made."""

    method: str
    kind: str
    accuracy: dict[str, float]
    artifact: str | None
    detail: str = ""


def aggregate(per_seed: list[list[MethodResult]], tasks: tuple[str, ...] = TASKS) -> list[dict[str, Any]]:
    """Mean and standard deviation over seeds of every method's accuracy on every task."""
    table = []
    for index, first in enumerate(per_seed[0]):
        row: dict[str, Any] = {"method": first.method, "kind": first.kind, "detail": first.detail}
        for name in tasks:
            values = [rows[index].accuracy[name] for rows in per_seed]
            mean = sum(values) / len(values)
            spread = (
                math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))
                if len(values) > 1
                else 0.0
            )
            row[name] = {"mean": mean, "std": spread, "values": values}
        table.append(row)
    return table


def settings_record(settings: DemoSettings) -> dict[str, Any]:
    return asdict(settings)
