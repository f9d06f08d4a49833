"""Scorer hooks: a batch of generations → one :class:`Scored` per example.

``SCORERS`` entries are ``(spec, examples, texts, options) -> list[Scored]``:

* ``answer`` — the task's extractor, then every metric; correct when the primary metric's score is
  above ``spec.threshold``. Verdicts: ``correct``, ``wrong``, ``no-answer`` (nothing extracted).
  When the task names a ``question`` field, the question itself is scored as the answer too
  (``Scored.echo``): the question-echo baseline, which needs no model.
* ``program`` — program of thought (PAL, https://arxiv.org/abs/2211.10435): extract the program,
  run it in the sandbox (a separate, limited process per program, a pool across cores), take the
  value ``solution()`` returned (else the last number printed) and compare it with the reference
  by the task's metric. A returned string is a number only if Python's ``float()`` reads it, as
  PAL's scorer (``float(answer)``): ``'-9,867,630'`` is not one. Verdicts: ``correct``, ``wrong``
  (ran, but the answer is off or not a number), ``no-code`` (no program in the text), ``error``
  (raised, or hit the memory, output or process limits; the sandbox's own verdict is kept in
  ``detail``) and ``timeout``.
* ``program_solution`` — as ``program``, but strictly PAL: the program must define ``solution()``
  and return the answer; one that only prints gets ``no-code``.

Identical programs run once per batch: a program gets no input, so its result is a function of its
text (a small model repeats itself a lot; the demo scores thousands of generations).
"""

from __future__ import annotations

import dataclasses
import inspect
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from lorasoup.config import require
from lorasoup.evaluation.extract import EXTRACTORS, extract_program, last_number
from lorasoup.evaluation.metrics import METRICS, reads_question
from lorasoup.registry import Registry

if TYPE_CHECKING:
    from lorasoup.evaluation.sandbox import ProgramCache
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
    echo: dict[str, Any] = field(default_factory=dict)  # {"correct", "scores"} of the question as answer


Scorer = Callable[["TaskSpec", Sequence["Example"], Sequence[str], SandboxOptions], list[Scored]]

SCORERS: Registry[Scorer] = Registry("task scorer")


def score_answer(
    spec: TaskSpec, extracted: str | None, reference: Any, question: str | None = None
) -> tuple[dict[str, float], bool]:
    """Every metric of the task on one extracted answer, and whether the primary one passes.

    ``question`` goes to the metrics that read it (``novel_token_f1``)."""
    scores = {}
    for name in spec.metric_names:
        metric = METRICS.get(name)
        args = dict(spec.metric_args or {}) if name == spec.metric else {}
        if reads_question(metric):
            args["question"] = question
        scores[name] = float(metric(extracted, reference, **args))
    return scores, scores[spec.metric] > spec.threshold


def question_of(spec: TaskSpec, example: Example) -> str | None:
    """The example's question (the spec's ``question`` field), or None when the task names none."""
    return None if spec.question is None else str(example.fields[spec.question])


def score_echo(spec: TaskSpec, example: Example) -> dict[str, Any]:
    """The question itself scored as the answer (``{}`` without a question): a model-free baseline that
    shows how much a metric rewards repeating the question."""
    question = question_of(spec, example)
    if question is None:
        return {}
    scores, correct = score_answer(spec, question, example.reference, question)
    return {"correct": correct, "scores": scores}


def metric_rule(spec: TaskSpec) -> dict[str, Any]:
    """What decides ``correct``, for ``run.json``: the metric, its arguments with defaults filled in,
    the threshold, and the rule in words (``numeric(abs_tol=0.001, rel_tol=0.0) > 0.5``)."""
    metric = METRICS.get(spec.metric)
    args = {
        name: parameter.default
        for name, parameter in inspect.signature(metric).parameters.items()
        if parameter.kind is inspect.Parameter.KEYWORD_ONLY and name != "question"
    }
    args.update(spec.metric_args or {})
    listed = ", ".join(f"{k}={v!r}" for k, v in args.items())
    return {
        "metric": spec.metric,
        "metric_args": args,
        "threshold": spec.threshold,
        "correct_when": f"{spec.metric}({listed}) > {spec.threshold:g}",
        "headline": spec.headline,
        "question": spec.question,
    }


@SCORERS.register("answer")
def answer(
    spec: TaskSpec, examples: Sequence[Example], texts: Sequence[str], options: SandboxOptions
) -> list[Scored]:
    extractor = EXTRACTORS.get(spec.extractor)
    results = []
    for example, text in zip(examples, texts, strict=True):
        extracted = extractor(text)
        scores, correct = score_answer(spec, extracted, example.reference, question_of(spec, example))
        verdict = "no-answer" if extracted is None else "correct" if correct else "wrong"
        results.append(Scored(extracted, verdict, correct, scores, echo=score_echo(spec, example)))
    return results


PROGRAM_SCORERS = frozenset({"program", "program_solution"})
"""Scorers that run model-written programs in the sandbox (run.json records its isolation)."""


def scoring_record(spec: TaskSpec, options: SandboxOptions) -> dict[str, Any]:
    """``run.json``'s ``scoring``: the rule behind ``correct`` (``metric_rule``) and, for tasks that run
    programs, the sandbox's isolation mode on this machine (``namespaces`` or ``fallback``), its
    layers and the limits."""
    record = metric_rule(spec)
    if spec.scorer in PROGRAM_SCORERS:
        from lorasoup.evaluation.sandbox import isolation

        found = isolation()
        record["sandbox"] = {
            "isolation": found.mode,
            "detail": found.detail,
            "layers": list(found.layers),
            "limits": dataclasses.asdict(options),
        }
    return record


def _run_programs(
    spec: TaskSpec,
    examples: Sequence[Example],
    texts: Sequence[str],
    options: SandboxOptions,
    *,
    require_solution: bool,
    cache: ProgramCache | None,
) -> list[Scored]:
    from lorasoup.evaluation.sandbox import SandboxLimits, run_programs

    codes = [extract_program(text) for text in texts]
    limits = SandboxLimits(
        timeout_s=options.timeout_s, cpu_s=max(1, math.ceil(options.timeout_s)), memory_mb=options.memory_mb
    )
    unique = list(dict.fromkeys(code for code in codes if code is not None))
    run = run_programs if cache is None else cache.run
    ran = run(unique, call="solution", limits=limits, workers=options.workers) if unique else []
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
    spec: TaskSpec,
    examples: Sequence[Example],
    texts: Sequence[str],
    options: SandboxOptions,
    cache: ProgramCache | None = None,
) -> list[Scored]:
    return _run_programs(spec, examples, texts, options, require_solution=False, cache=cache)


@SCORERS.register("program_solution")
def program_solution(
    spec: TaskSpec,
    examples: Sequence[Example],
    texts: Sequence[str],
    options: SandboxOptions,
    cache: ProgramCache | None = None,
) -> list[Scored]:
    return _run_programs(spec, examples, texts, options, require_solution=True, cache=cache)


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
    if run.returned is not None and run.returned_type == "str" and not _python_float(run.returned):
        scores, _ = score_answer(spec, None, example.reference)
        shown = run.returned if len(run.returned) <= 60 else run.returned[:57] + "..."
        detail = f"solution() returned the string {shown!r}, not a number"
        return Scored(run.returned, "wrong", False, scores, detail)
    answer_text = run.returned if run.returned is not None else last_number(run.stdout or "")
    scores, correct = score_answer(spec, answer_text, example.reference)
    detail = "" if answer_text is not None else "the program returned and printed nothing"
    return Scored(answer_text, "correct" if correct else "wrong", correct, scores, detail)


def _python_float(text: str) -> bool:
    """Whether ``float(text)`` reads it, as PAL's scorer converts a returned string."""
    try:
        float(text)
    except ValueError:
        return False
    return True


def _last_line(text: str, limit: int = 300) -> str:
    lines = [line for line in (text or "").splitlines() if line.strip()]
    line = lines[-1].strip() if lines else ""
    return line if len(line) <= limit else line[: limit - 3] + "..."
