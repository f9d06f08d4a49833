"""Data for the real-model demo (``lorasoup demo --model smollm2``), from a package that ships it.

``reasoning-gym`` (https://github.com/open-thought/reasoning-gym, Apache-2.0) provides both skills:

* **math skill** — ``gsm_symbolic``: GSM8K-style word problems drawn from about 85 problem families
  (GSM-Symbolic, https://arxiv.org/abs/2410.05229), each with a worked answer ending ``#### N``.
  Record: problem → worked answer; scored by the last number of the answer.
* **code skill** — by default (``code_skill="procedural"``, ``procedural.py``) programs for stated
  computations that are not word problems (arithmetic, linear equations, number theory, bits, letters)
  from reasoning-gym's procedural generators, each checked in the sandbox; scored on instances from
  another stream. The first design (``code_skill="codeio"``, kept so its published runs reproduce):
  CodeI/O (https://arxiv.org/abs/2502.07316): task descriptions with a reference
  ``main_solution`` and an input generator. We keep tasks whose program needs only the standard
  library, is short, and returns a number; an input is drawn and the reference is run **in lorasoup's
  sandbox** (the dataset's code is untrusted), which gives the expected value. Record: task + input
  → a program that defines ``main_solution`` and a ``solution()`` calling it; scored by running it.
  Tasks whose reference is random (two runs disagree) or slow are left out; the code skill is tested
  on tasks held out of its training data.
* **composite task** — a word problem answered by a PAL program (https://arxiv.org/abs/2211.10435):
  ``def solution(): ... return``, run in the sandbox, compared with the numeric answer (the spirit of
  the paper's GSM-Hard task). The oracle's training data are PAL programs made from the worked answers
  (:func:`pal_program`), kept only when they reproduce the answer.

Programs (code skill, composite) are written in a ```` ```python ```` block, as the instruct model
writes code.

Problems whose worked answer does not convert, or takes more than ``max_steps`` equations, are left
out of every split alike, so the math and composite sets are the same population; so are records over
the study's token budget. All splits come from one seed: the same seed gives the same records.
"""

from __future__ import annotations

import ast
import builtins
import gzip
import importlib.resources
import itertools
import json
import keyword
import math
import random
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from lorasoup.demo.benchmark import Benchmark
from lorasoup.demo.programs import PROGRAM_REQUEST, arithmetic, fenced, reasoning_gym
from lorasoup.errors import DataError

GSM_SUFFIX = " Give the result as your final answer. Do not include units."
"""What ``gsm_symbolic`` appends to its questions; kept for the math skill, replaced for programs."""


@dataclass(frozen=True)
class RealSizes:
    """How much data: training records per skill (and for the oracle), test examples per task."""

    skill: int = 160  # = lora_steps × batch_size: one epoch
    test: int = 30  # per task; 14 rows × 3 tasks are scored, generation dominates on a CPU
    max_steps: int = 3  # GSM problems kept: worked answers of at most this many equations
    code_chars: int = 500  # CodeI/O programs kept: at most this many characters (comments removed)


@dataclass(frozen=True)
class GsmProblem:
    """One ``gsm_symbolic`` problem: question (without the package's suffix), worked answer, program."""

    question: str
    worked: str
    program: str
    value: int | float


@dataclass(frozen=True)
class CodeTask:
    """One CodeI/O task: description, reference program (comments dropped), input generator."""

    index: int
    description: str
    code: str
    generator: str


def math_record(problem: GsmProblem) -> dict[str, Any]:
    return {"instruction": problem.question + GSM_SUFFIX, "output": problem.worked, "value": problem.value}


def composite_record(problem: GsmProblem) -> dict[str, Any]:
    return {
        "instruction": f"{problem.question}\n{PROGRAM_REQUEST}",
        "output": fenced(problem.program),
        "value": problem.value,
    }


# ------------------------------------------------------------------------------------------------
# Worked answer → PAL program

# Numbers (thousands commas, decimals, percent), unit denominators ("/week"), words, operators.
_TOKEN = re.compile(
    r"(?P<num>\d[\d,]*(?:\.\d+)?%?)|(?P<unit>/\s*[A-Za-z]+)|(?P<word>[A-Za-z']+)|(?P<op>[-+*/×÷()])|\S"
)
_RESULT = re.compile(r"-?\d[\d,]*(?:\.\d+)?")
_NAME = re.compile(r"[A-Za-z]+")


def _same(a: float, b: float) -> bool:
    return math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-9)


@dataclass
class _Token:
    """A piece of an equation: a number (with the unit word written after it) or an operator."""

    text: str
    value: float | None = None
    unit: str = ""


def _expression_tokens(text: str) -> list[_Token]:
    """The arithmetic in a stretch of prose: numbers and operators; each number keeps its unit word."""
    tokens: list[_Token] = []
    for match in _TOKEN.finditer(text):
        kind, value = match.lastgroup, match.group()
        if kind == "num":
            number = value.rstrip("%").replace(",", "")
            percent = value.endswith("%")
            tokens.append(
                _Token(f"({number} / 100)" if percent else number, None if percent else float(number))
            )
        elif kind == "op" or (kind == "word" and value == "x"):  # "400 x 8": x as times
            tokens.append(_Token({"×": "*", "x": "*", "÷": "/"}.get(value, value)))
        elif kind == "word" and tokens and tokens[-1].value is not None and not tokens[-1].unit:
            tokens[-1].unit = value.lower()
    return tokens


def _equation(left: str, result: float) -> list[_Token] | None:
    """The expression ending ``left`` that evaluates to ``result``, if any.

    Prose before an equation may hold numbers of its own ("In 2 weeks he ..."), so tokens are dropped
    from the front until what is left computes the result.
    """
    tokens = _expression_tokens(left.split(":")[-1])
    while tokens and tokens[-1].text in "+-*/(":
        tokens.pop()
    for start in range(len(tokens)):
        candidate = tokens[start:]
        if sum(any(c.isdigit() for c in t.text) for t in candidate) < 2:
            break
        try:
            value = arithmetic(" ".join(t.text for t in candidate))
        except (SyntaxError, ValueError, ZeroDivisionError, TypeError):
            continue
        if _same(value, result):
            return candidate
    return None


@dataclass
class _Step:
    tokens: list[_Token]
    result: float
    unit: str


def _steps(worked: str) -> list[_Step]:
    """Every verified equation of a worked answer, with the unit word written after its result."""
    found = []
    for line in worked.splitlines():
        if line.startswith("####"):
            continue
        sides = line.split("=")
        for left, right in itertools.pairwise(sides):
            match = _RESULT.search(right.replace("$", "").replace("£", "").replace("€", ""))
            if match is None:
                continue
            result = float(match.group().replace(",", ""))
            tokens = _equation(left, result)
            if tokens is not None:
                unit = _NAME.match(right[match.end() :].strip())
                found.append(_Step(tokens, result, unit.group().lower() if unit else ""))
    return found


def pal_program(question: str, worked: str, answer: float) -> str | None:
    """A PAL program computing ``answer`` from a GSM-style worked answer, or None if none is found.

    Each equation ``a op b = c`` of the worked answer becomes an assignment to a variable named after
    the unit written after ``c``. A later number is written as an earlier result's variable when it
    equals that result and either carries the same unit or carries none and is not a number of the
    question, so the program computes rather than quotes (but "12 months" never reuses "12 days").
    The last equation must give ``answer``.
    """
    steps = _steps(worked)
    if not steps or not _same(steps[-1].result, answer):
        return None
    literals = {float(n.replace(",", "")) for n in _RESULT.findall(question)}
    names: dict[str, tuple[float, str]] = {}
    lines = []
    for step in steps:
        parts = []
        for token in step.tokens:
            reused = token.value is not None and next(
                (
                    name
                    for name, (value, unit) in reversed(names.items())
                    if _same(value, token.value)
                    and (token.unit == unit if token.unit else token.value not in literals)
                ),
                None,
            )
            parts.append(reused or token.text)
        name = _variable(step.unit, names)
        names[name] = (step.result, step.unit)
        lines.append(f"    {name} = {' '.join(parts)}")
    lines.append(f"    return {name}")
    # Each equation was checked to compute its result, and a reused variable holds the number it
    # replaces, so the program returns the last result, which is the answer.
    return "def solution():\n" + "\n".join(lines) + "\n"


def _variable(unit: str, taken: dict[str, Any]) -> str:
    base = unit if unit and not keyword.iskeyword(unit) and not hasattr(builtins, unit) else "value"
    name, n = base, 2
    while name in taken or name == "solution":
        name, n = f"{base}_{n}", n + 1
    return name


# ------------------------------------------------------------------------------------------------
# Drawing problems and tasks


def gsm_problems(seed: int, *, max_steps: int) -> Iterator[GsmProblem]:
    """``gsm_symbolic`` problems of one seeded stream, converted and filtered (distinct questions)."""
    dataset = reasoning_gym().create_dataset("gsm_symbolic", size=100_000, seed=seed)
    seen: set[str] = set()
    for index in range(len(dataset)):
        item = dataset[index]
        question = item["question"].removesuffix(GSM_SUFFIX)
        worked, value = item["metadata"]["answer_cot"], item["metadata"]["answer_value"]
        if question in seen or isinstance(value, bool) or not isinstance(value, int | float):
            continue
        program = pal_program(question, worked, float(value))
        if program is None or program.count("\n") - 2 > max_steps:
            continue
        seen.add(question)
        yield GsmProblem(question, worked, program, value)


_STDLIB = {"math", "random", "itertools", "collections", "functools", "string", "fractions", "heapq"}
_IMPORT = re.compile(r"^\s*(?:import|from)\s+(\w+)", re.MULTILINE)
_RETURNS_NUMBER = re.compile(r"`return` \((?:int|float)\)")


def code_tasks(max_chars: int) -> list[CodeTask]:
    """CodeI/O tasks whose ``main_solution`` returns a number, imports only the standard library and
    is at most ``max_chars`` long once comments and docstrings are dropped (the sandbox has no
    site-packages)."""
    path = importlib.resources.files(reasoning_gym()) / "data" / "codeio.jsonl.gz"
    with gzip.open(str(path), "rt", encoding="utf-8") as handle:
        rows = [json.loads(line) for line in handle]
    tasks = []
    for index, row in enumerate(rows):
        code = row["code_sample"]
        if "def main_solution(" not in code or not _RETURNS_NUMBER.search(row["input_output_spec"]):
            continue
        if not set(_IMPORT.findall(code)) <= _STDLIB:
            continue
        try:
            code = _without_comments(code)
        except SyntaxError:
            continue
        if len(code) <= max_chars:
            tasks.append(CodeTask(index, row["task_description"].strip(), code, row["input_generator"]))
    return tasks


def _without_comments(code: str) -> str:
    """The program re-printed from its syntax tree: comments and docstrings gone (shorter prompts)."""
    tree = ast.parse(code)
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(getattr(first, "value", None), ast.Constant):
                node.body = node.body[1:] or [ast.Pass()]
    return ast.unparse(tree)


_PROBE = """from random import Random
{code}

{generator}

def solution():
    import json
    import random
    inputs = generate_inputs(Random({seed}))
    inputs = {{k: round(v, 2) if isinstance(v, float) else v for k, v in inputs.items()}}
    random.seed({salt})
    return json.dumps([inputs, main_solution(**inputs)])
"""
_SLOW_S = 1.0  # references slower than this are left out: the study's sandbox allows 2 s a program


def code_records(tasks: list[tuple[CodeTask, int]], *, max_args_chars: int = 80) -> list[dict[str, Any]]:
    """One record per ``(task, input seed)`` whose reference ran in the sandbox and returned a number.

    Float inputs are rounded to two decimals (short prompts); the value is what the reference returns
    for exactly the input written in the prompt and in the program. Each reference runs twice, in two
    processes with the ``random`` module seeded differently: a task whose answer changes (it draws
    random numbers, or depends on hash order) has no reference value and is left out.
    """
    from lorasoup.evaluation.sandbox import SandboxLimits, run_programs

    probes = [
        _PROBE.format(code=t.code, generator=t.generator, seed=s, salt=salt)
        for salt in (1, 2)
        for t, s in tasks
    ]
    limits = SandboxLimits(timeout_s=5.0, cpu_s=5, memory_mb=256)
    runs = run_programs(probes, call="solution", limits=limits)
    records = []
    for (task, _), run, rerun in zip(tasks, runs[: len(tasks)], runs[len(tasks) :], strict=True):
        if run.verdict != "ok" or run.returned is None or run.returned != rerun.returned:
            continue
        if max(run.duration_s, rerun.duration_s) > _SLOW_S:
            continue
        inputs, value = json.loads(run.returned)
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
            continue
        arguments = ", ".join(f"{name}={argument!r}" for name, argument in inputs.items())
        if len(arguments) > max_args_chars:
            continue
        program = fenced(f"{task.code}\n\ndef solution():\n    return main_solution({arguments})\n")
        records.append(
            {
                "instruction": f"{task.description}\nInput: {arguments}\n{PROGRAM_REQUEST}",
                "output": program,
                "value": value,
                "task": task.index,
            }
        )
    return records


Fits = Callable[[dict[str, Any]], bool]
"""Whether a record fits the study's token budget (the study knows the tokenizer; the data does not)."""


def _code_split(
    tasks: list[CodeTask], count: int, rng: random.Random, fits: Fits, *, rounds: int = 8
) -> list[dict[str, Any]]:
    """``count`` distinct records over ``tasks`` that ``fit`` (several inputs per task when needed).

    A task that gives no usable record in a round (its reference failed, or its record is too long)
    is not drawn again.
    """
    records: list[dict[str, Any]] = []
    seen: set[str] = set()
    pool = list(tasks)
    for _ in range(rounds):
        need = count - len(records)
        if need <= 0 or not pool:
            break
        chosen = [(pool[i % len(pool)], rng.randrange(2**31)) for i in range(max(need, len(pool)))]
        useful: set[int] = set()
        for record in code_records(chosen):
            if fits(record):
                useful.add(record["task"])
                if record["instruction"] not in seen and len(records) < count:
                    seen.add(record["instruction"])
                    records.append(record)
        pool = [task for task in pool if task.index in useful]
    if len(records) < count:
        raise DataError(
            f"only {len(records)} of {count} code records could be built from {len(tasks)} CodeI/O tasks; "
            "lower sizes.skill / sizes.test, or raise cutoff_len or sizes.code_chars"
        )
    return records


def build_real_benchmark(
    seed: int, sizes: RealSizes = RealSizes(), fits: Fits | None = None, code_skill: str = "procedural"
) -> Benchmark:
    """Every split of the real-model demo from one seed (see the module doc); ``base`` is empty.

    ``fits`` keeps only records within the study's token budget (a GSM problem only when both its
    math and its program record fit), so training never truncates an answer.
    """
    fits = fits or (lambda record: True)
    problems = (
        p
        for p in gsm_problems(seed, max_steps=sizes.max_steps)
        if fits(math_record(p)) and fits(composite_record(p))
    )
    gsm = [next(problems) for _ in range(2 * sizes.test + 2 * sizes.skill)]
    test, train = gsm[: 2 * sizes.test], gsm[2 * sizes.test :]
    code_train, code_test = _code_splits(seed, sizes, fits, code_skill)
    return Benchmark(
        base=[],
        train={
            "math": [math_record(p) for p in train[: sizes.skill]],
            "code": code_train,
            "composite": [composite_record(p) for p in train[sizes.skill :]],
        },
        test={
            "composite": [composite_record(p) for p in test[: sizes.test]],
            "math": [math_record(p) for p in test[sizes.test :]],
            "code": code_test,
        },
    )


CODE_SKILLS = ("procedural", "codeio")
"""Where the code skill's programs come from: reasoning-gym's procedural generators (``procedural.py``,
the default) or CodeI/O tasks (the first design, kept so that its published run reproduces)."""


def _code_splits(
    seed: int, sizes: RealSizes, fits: Fits, code_skill: str
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The code skill's training and test records."""
    if code_skill == "procedural":
        from lorasoup.demo.procedural import procedural_code_split

        train = procedural_code_split(seed, sizes.skill, fits)
        exclude = {record["instruction"] for record in train}
        return train, procedural_code_split(seed, sizes.test, fits, test=True, exclude=exclude)
    tasks = code_tasks(sizes.code_chars)
    rng = random.Random(seed)
    rng.shuffle(tasks)
    # Test tasks are held out: the code skill is scored on tasks it never saw.
    held_out = max(1, min(sizes.test, len(tasks) // 3))
    test_tasks, train_tasks = tasks[:held_out], tasks[held_out:]
    return _code_split(train_tasks, sizes.skill, rng, fits), _code_split(test_tasks, sizes.test, rng, fits)
