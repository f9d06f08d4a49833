"""Scorer hooks: a batch of generations → one :class:`Scored` per example.

``SCORERS`` entries are ``(spec, examples, texts, options) -> list[Scored]``:

* ``answer`` — the task's extractor, then every metric; correct when the primary metric's score is
  above ``spec.threshold``. Verdicts: ``correct``, ``wrong``, ``no-answer`` (nothing extracted).
* ``program`` — program of thought (PAL, https://arxiv.org/abs/2211.10435): extract the program,
  run it in the sandbox (a separate, limited process per program, a pool across cores), take the
  value ``solution()`` returned (else the last number printed) and compare it with the reference
  by the task's metric. Verdicts: ``correct``, ``wrong`` (ran, but the answer is off or not a
  number), ``no-code`` (no program in the text), ``error`` (raised, or hit the memory, output or
  process limits; the sandbox's own verdict is kept in ``detail``) and ``timeout``.
* ``program_solution`` — as ``program``, but strictly PAL: the program must define ``solution()``
  and return the answer; one that only prints gets ``no-code``.

Identical programs run once per batch: a program gets no input, so its result is a function of its
text (a small model repeats itself a lot; the demo scores thousands of generations).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from lorasoup.config import require
from lorasoup.evaluation.extract import EXTRACTORS, extract_program, last_number
from lorasoup.evaluation.metrics import METRICS
from lorasoup.registry import Registry

if TYPE_CHECKING:
    from lorasoup.evaluation.tasks.data import Example
    from lorasoup.evaluation.tasks.spec import TaskSpec

VERDICTS = ("correct", "wrong", "no-answer", "no-code", "error", "timeout")


@dataclass
class SandboxOptions:
    """Limits for running model-written programs (see ``lorasoup.evaluation.sandbox``)."""

    timeout_s: float = 5.0
    memory_mb: int = 512
    workers: int | None = None

    def validate(self) -> None:
        require(self.timeout_s > 0, f"sandbox.timeout_s must be positive, got {self.timeout_s}")
        require(self.memory_mb >= 32, f"sandbox.memory_mb must be at least 32, got {self.memory_mb}")
        require(self.workers is None or self.workers >= 1, "sandbox.workers must be at least 1")


@dataclass
class Scored:
    """What scoring found for one example."""

    extracted: str | None
    verdict: str
    correct: bool
    scores: dict[str, float] = field(default_factory=dict)
    detail: str = ""


Scorer = Callable[["TaskSpec", Sequence["Example"], Sequence[str], SandboxOptions], list[Scored]]

SCORERS: Registry[Scorer] = Registry("task scorer")


def score_answer(spec: TaskSpec, extracted: str | None, reference: Any) -> tuple[dict[str, float], bool]:
    """Every metric of the task on one extracted answer, and whether the primary one passes."""
    args = spec.metric_args or {}
    scores = {spec.metric: float(METRICS.get(spec.metric)(extracted, reference, **args))}
    for name in spec.extra_metrics:
        scores[name] = float(METRICS.get(name)(extracted, reference))
    return scores, scores[spec.metric] > spec.threshold


@SCORERS.register("answer")
def answer(
    spec: TaskSpec, examples: Sequence[Example], texts: Sequence[str], options: SandboxOptions
) -> list[Scored]:
    extractor = EXTRACTORS.get(spec.extractor)
    results = []
    for example, text in zip(examples, texts, strict=True):
        extracted = extractor(text)
        scores, correct = score_answer(spec, extracted, example.reference)
        verdict = "no-answer" if extracted is None else "correct" if correct else "wrong"
        results.append(Scored(extracted, verdict, correct, scores))
    return results


def _run_programs(
    spec: TaskSpec,
    examples: Sequence[Example],
    texts: Sequence[str],
    options: SandboxOptions,
    *,
    require_solution: bool,
) -> list[Scored]:
    from lorasoup.evaluation.sandbox import SandboxLimits, run_programs

    codes = [extract_program(text) for text in texts]
    limits = SandboxLimits(
        timeout_s=options.timeout_s, cpu_s=max(1, math.ceil(options.timeout_s)), memory_mb=options.memory_mb
    )
    unique = list(dict.fromkeys(code for code in codes if code is not None))
    ran = run_programs(unique, call="solution", limits=limits, workers=options.workers) if unique else []
    by_code = dict(zip(unique, ran, strict=True))
    results = []
    for code, example in zip(codes, examples, strict=True):
        if code is None:
            scores, _ = score_answer(spec, None, example.reference)
            results.append(Scored(None, "no-code", False, scores, "no program found in the generation"))
            continue
        results.append(_judge_run(spec, example, by_code[code], require_solution=require_solution))
    return results


@SCORERS.register("program")
def program(
    spec: TaskSpec, examples: Sequence[Example], texts: Sequence[str], options: SandboxOptions
) -> list[Scored]:
    return _run_programs(spec, examples, texts, options, require_solution=False)


@SCORERS.register("program_solution")
def program_solution(
    spec: TaskSpec, examples: Sequence[Example], texts: Sequence[str], options: SandboxOptions
) -> list[Scored]:
    return _run_programs(spec, examples, texts, options, require_solution=True)


def _judge_run(spec: TaskSpec, example: Example, run: Any, *, require_solution: bool) -> Scored:
    """A sandbox ``ProgramResult`` → verdict: timeout, error, or the answer scored by the metric."""
    if run.verdict != "ok":
        scores, _ = score_answer(spec, None, example.reference)
        verdict = "timeout" if run.verdict == "timeout" else "error"
        detail = f"{run.verdict}: {_last_line(run.detail or run.stderr)}"
        return Scored(None, verdict, False, scores, detail)
    if require_solution and run.returned is None:
        scores, _ = score_answer(spec, None, example.reference)
        return Scored(None, "no-code", False, scores, "no solution() returned a value")
    answer_text = run.returned if run.returned is not None else last_number(run.stdout or "")
    scores, correct = score_answer(spec, answer_text, example.reference)
    detail = "" if answer_text is not None else "the program returned and printed nothing"
    return Scored(answer_text, "correct" if correct else "wrong", correct, scores, detail)


def _last_line(text: str, limit: int = 300) -> str:
    lines = [line for line in (text or "").splitlines() if line.strip()]
    line = lines[-1].strip() if lines else ""
    return line if len(line) <= limit else line[: limit - 3] + "..."
