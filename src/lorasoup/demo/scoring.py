"""The demo's tasks (composite, math, code; the three-skill and format variants) and its scorer.

``Scorer`` evaluates a model on every task's test set through ``evaluate_model`` (programs run in the
sandbox) and keeps every per-example record under ``eval/<method>/<task>.jsonl``.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from lorasoup.artifacts import atomic_file
from lorasoup.demo.benchmark import Benchmark
from lorasoup.demo.device import resolve_device
from lorasoup.demo.settings import TASKS, DemoSettings
from lorasoup.errors import LorasoupError
from lorasoup.evaluation.generate import GenerationSettings
from lorasoup.evaluation.sandbox import ProgramCache
from lorasoup.evaluation.tasks import SandboxOptions, Task, TaskSpec


def _task_specs(template: str = "plain") -> dict[str, TaskSpec]:
    """Every demo task, prompts in ``template`` (``plain``; a frame of the format-robustness rows)."""
    from lorasoup.evaluation.generate import GenerationOptions

    def spec(name: str, description: str, **scoring: str) -> TaskSpec:
        generation = GenerationOptions(max_new_tokens=16, stop=[])
        return TaskSpec(
            name=name, description=description, template=template, generation=generation, **scoring
        )

    program = {"reference": "value", "scorer": "program_solution", "metric": "numeric"}
    return {
        "composite": spec(
            "demo-composite", "multiplication story → PAL program; the sandbox calls solution()", **program
        ),
        "math": spec(
            "demo-math",
            "multiplication story → 'answer : a * b'",
            reference="output",
            extractor="strip",
            metric="exact_text",
        ),
        "code": spec(
            "demo-code",
            "addition/subtraction story → PAL program (the code skill on its own ground)",
            **program,
        ),
        "composite3": spec(
            "demo-composite3", "multiplication story + 'then ... c more' → PAL program, a * b + c", **program
        ),
        "extra": spec(
            "demo-extra",
            "addition/subtraction story + 'then ... c more' → 'answer : a + b + c'",
            reference="output",
            extractor="strip",
            metric="exact_text",
        ),
    }


def task_specs(names: tuple[str, ...] = TASKS) -> dict[str, TaskSpec]:
    """The tasks ``names`` (``TASKS``; ``TASKS_K3`` for the three-skill study), in the plain frame."""
    every = _task_specs()
    return {name: every[name] for name in names}


def format_specs(formats: list[str], task: str = "composite") -> dict[str, TaskSpec]:
    """``task`` once per prompt frame, keyed by the frame's name (the format-robustness rows)."""
    return {name: _task_specs(name)[task] for name in formats}


class Scorer:
    """Scores models on test sets (by default the three of ``TASKS``) and keeps every per-example record.

    ``specs``: the tasks by name; ``splits``: the test split each one reads (default: its own name;
    the format rows read ``composite`` under every frame's name). Models are moved to the settings'
    device before they generate.
    """

    def __init__(
        self,
        benchmark: Benchmark,
        tokenizer: Any,
        settings: DemoSettings,
        out_dir: Path,
        specs: dict[str, TaskSpec] | None = None,
        splits: dict[str, str] | None = None,
    ) -> None:
        self.tokenizer = tokenizer
        self.tasks = {name: Task(spec, num_fewshot=0) for name, spec in (specs or task_specs()).items()}
        splits = splits or {}
        self.examples = {
            name: task.examples(benchmark.test[splits.get(name, name)]) for name, task in self.tasks.items()
        }
        self.settings = GenerationSettings(max_new_tokens=16, batch_size=settings.eval_batch_size)
        self.batch_sizes: dict[str, int] = {}
        self.out_dir = out_dir
        self.device = resolve_device(settings.device)
        self.backend = getattr(settings, "eval_backend", "hf")
        self.merge_adapters = getattr(settings, "merged_scoring", False)  # the real study's option
        self.fallbacks: list[str] = []  # "method / task: why" for each score the hf backend had to redo
        # Every row scores the same test sets, and many rows write the same programs: run each once.
        self.programs = ProgramCache()
        # method → task → the evaluation's throughput (generate_s, score_s, tokens): where a row's
        # time goes, for the GPU runs' run records (tasks a resumed run had scored are not timed)
        self.timings: dict[str, dict[str, dict[str, Any]]] = {}

    def add_task(self, name: str, task: Task, examples: list[Any], batch_size: int | None = None) -> None:
        """Score ``task`` on ``examples`` too (a task read from files, such as GSM-Hard)."""
        self.tasks[name], self.examples[name] = task, examples
        if batch_size is not None:
            self.batch_sizes[name] = batch_size

    def score(self, method: str, model: torch.nn.Module) -> dict[str, float]:
        model = model.to(self.device)
        if self.merge_adapters and hasattr(model, "merge_and_unload"):  # a PeftModel: W0 + s·BA in place
            model = model.merge_and_unload()
        accuracy = {}
        folder = self.out_dir / slug(method)
        folder.mkdir(parents=True, exist_ok=True)
        backend = self.backend  # a model the CUDA-graph backend refused once is scored by hf for every task
        for name in self.tasks:
            path = folder / f"{name}.jsonl"
            scored = scored_accuracy(path, len(self.examples[name]))
            if scored is not None:  # a resumed run: this row's task was scored before it stopped
                accuracy[name] = scored
                continue
            outcome, backend = self._evaluate(method, name, model, backend)
            with atomic_file(path) as temporary, temporary.open("w", encoding="utf-8") as handle:
                for result in outcome.results:
                    handle.write(json.dumps(result.to_json()) + "\n")
            accuracy[name] = outcome.summary["accuracy"]
            self.timings.setdefault(method, {})[name] = outcome.throughput | {"backend": backend}
        return accuracy

    def _evaluate(self, method: str, name: str, model: torch.nn.Module, backend: str) -> tuple[Any, str]:
        """One task's outcome through ``backend``, and the backend for the model's next task: a model
        the CUDA-graph backend cannot capture is scored again with the hf backend, which it keeps, and
        the fallback is recorded (``fallbacks``)."""
        from lorasoup.evaluation.runner import evaluate_model

        settings = self.tasks[name].spec.generation.apply(self.settings)  # the task's own token budget
        if name in self.batch_sizes:
            settings = replace(settings, batch_size=self.batch_sizes[name])
        sandbox = SandboxOptions(timeout_s=2.0, memory_mb=256)
        task, examples = self.tasks[name], self.examples[name]
        if backend != "hf":
            try:
                outcome = evaluate_model(
                    model, self.tokenizer, task, examples, settings, sandbox=sandbox, backend=backend,
                    program_cache=self.programs,
                )  # fmt: skip
                return outcome, backend
            except (LorasoupError, RuntimeError, NotImplementedError, TypeError, ValueError) as exc:
                self.fallbacks.append(f"{method} / {name}: {' '.join(str(exc).split())[:200]}")
        outcome = evaluate_model(
            model, self.tokenizer, task, examples, settings, sandbox=sandbox, program_cache=self.programs
        )
        return outcome, "hf"


def scored_accuracy(path: Path, examples: int) -> float | None:
    """The accuracy in a per-example file written whole (atomically) for ``examples`` examples, or None
    when there is no such file."""
    if not path.is_file():
        return None
    records = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if len(records) != examples:
        return None
    return sum(bool(record["correct"]) for record in records) / examples


def slug(method: str) -> str:
    """A method's folder name: ``CAT (trained)`` → ``cat-trained``."""
    return "-".join("".join(c if c.isalnum() else " " for c in method.lower()).split())


def write_records(path: Path, records: list[dict[str, Any]]) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(records), encoding="utf-8")
    return str(path)
