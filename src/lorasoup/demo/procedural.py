"""The real-model study's code skill: programs for computations that are *not* word problems.

The code skill must teach "turn a stated computation into a Python program that defines
``solution()``", the half of GSM-Hard's program-of-thought that is not reading a story. Its records
come from reasoning-gym's procedural generators (https://github.com/open-thought/reasoning-gym):
arithmetic expressions, linear equations, number theory, bits, bases, letters. Each problem is
rendered as a statement ("Calculate ( 56 + -33 ) - 84.") and a program built from the generator's
ground truth in the layout the composite task's PAL programs use (one assignment per step, then
``return``), in a ```` ```python ```` block:

    def solution():
        step_1 = 56 + -33
        result = step_1 - 84
        return result

Every program is run **in lorasoup's sandbox** and kept only when ``solution()`` returns the
generator's answer, so a record never teaches a wrong program. No generator here tells a story:
the issue's rule is that no word problem may appear in the code data (``leg_counting``, whose
answer needs legs per animal, is left out for that reason, as are generators whose answers are not
numbers).

Test records come from a different reasoning-gym seed than training records, and an instruction
that appears in training is never a test instruction.
"""

from __future__ import annotations

import ast
import json
import math
import random
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from lorasoup.demo.programs import PROGRAM_REQUEST, arithmetic, fenced, reasoning_gym
from lorasoup.errors import DataError


@dataclass(frozen=True)
class ProceduralProgram:
    """A statement, the program that computes it, and the generator's answer."""

    generator: str
    statement: str
    program: str
    value: int | float


Builder = Callable[[dict[str, Any]], "tuple[str, str] | None"]
"""reasoning-gym item → (statement, program body lines joined), or None to leave the item out."""


def _function(lines: list[str], *, imports: tuple[str, ...] = ()) -> str:
    head = "".join(f"import {name}\n" for name in imports) + ("\n" if imports else "")
    return head + "def solution():\n" + "".join(f"    {line}\n" for line in lines)


_BINARY = {ast.Add: "+", ast.Sub: "-", ast.Mult: "*", ast.Div: "/"}


def expression_steps(expression: str) -> list[str] | None:
    """Assignments computing an arithmetic expression one operation at a time, innermost first; the
    last assigns ``result``. None when the expression holds anything but numbers and ``+ - * /``.

    ``( 56 + -33 ) - 84`` → ``["step_1 = 56 + -33", "result = step_1 - 84"]``
    """
    try:
        tree = ast.parse(expression, mode="eval").body
    except SyntaxError:
        return None
    steps: list[str] = []

    def operand(node: ast.AST) -> str | None:
        if isinstance(node, ast.Constant) and type(node.value) in (int, float):
            return ast.unparse(node)
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
            inner = operand(node.operand)
            return None if inner is None else f"-{inner}" if inner[0].isdigit() else f"-({inner})"
        if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
            left, right = operand(node.left), operand(node.right)
            if left is None or right is None:
                return None
            name = f"step_{len(steps) + 1}"
            steps.append(f"{name} = {left} {_BINARY[type(node.op)]} {right}")
            return name
        return None

    last = operand(tree)
    if last is None or not steps:
        return None
    if last == f"step_{len(steps)}":
        steps[-1] = "result" + steps[-1][steps[-1].index(" =") :]
    else:  # a negation wraps the last operation: -( 67 - 42 )
        steps.append(f"result = {last}")
    return [*steps, "return result"]


def _arithmetic(item: dict[str, Any]) -> tuple[str, str] | None:
    expression = item["metadata"].get("expression")
    if expression is None:
        return None
    steps = expression_steps(expression)
    return None if steps is None else (f"Calculate {expression.strip()}.", _function(steps))


_DECIMAL_EXPRESSION = re.compile(r"\n(?P<expression>[-+*/().\d\s]+?)\s*=\s*\?\s*$")


def _decimal_arithmetic(item: dict[str, Any]) -> tuple[str, str] | None:
    match = _DECIMAL_EXPRESSION.search(item["question"])
    steps = match and expression_steps(match["expression"])
    return (f"Calculate {match['expression'].strip()}.", _function(steps)) if match and steps else None


def _linear_side(side: str, variable: str, at: int) -> float:
    return arithmetic(re.sub(rf"\b{re.escape(variable)}\b", f"({at})", side))


def _simple_equation(item: dict[str, Any]) -> tuple[str, str] | None:
    """``20*h + 65 = 1485`` → the constant and the coefficient read off the left side, then ``h``."""
    equation, variable = item["metadata"]["equation"], item["metadata"]["variable"]
    left, _, right = equation.partition("=")
    if variable in right:
        return None
    try:
        constant = _linear_side(left, variable, 0)
        coefficient = _linear_side(left, variable, 1) - constant
        total = float(right)
    except (SyntaxError, ValueError, ZeroDivisionError):
        return None
    if coefficient == 0 or not all(float(x).is_integer() for x in (constant, coefficient, total)):
        return None
    lines = [
        f"constant = {int(constant)}",
        f"coefficient = {int(coefficient)}",
        f"{variable} = ({int(total)} - constant) / coefficient",
        f"return {variable}",
    ]
    return f"Solve for {variable}: {equation.strip()}", _function(lines)


def _gcd(item: dict[str, Any]) -> tuple[str, str] | None:
    numbers = item["metadata"]["numbers"]
    statement = f"Find the greatest common divisor of {', '.join(map(str, numbers))}."
    return statement, _function(
        [f"numbers = {numbers!r}", "result = math.gcd(*numbers)", "return result"], imports=("math",)
    )


def _lcm(item: dict[str, Any]) -> tuple[str, str] | None:
    numbers = item["metadata"]["numbers"]
    statement = f"Find the least common multiple of {', '.join(map(str, numbers))}."
    return statement, _function(
        [f"numbers = {numbers!r}", "result = math.lcm(*numbers)", "return result"], imports=("math",)
    )


def _count_bits(item: dict[str, Any]) -> tuple[str, str] | None:
    number = item["metadata"]["number"]
    statement = f"How many 1 bits are there in the binary representation of {number}?"
    return statement, _function([f"number = {number}", 'result = bin(number).count("1")', "return result"])


def _count_primes(item: dict[str, Any]) -> tuple[str, str] | None:
    start, end = item["metadata"]["start"], item["metadata"]["end"]
    lines = [
        "count = 0",
        f"for number in range({start}, {end} + 1):",
        "    if number > 1 and all(number % d for d in range(2, int(number ** 0.5) + 1)):",
        "        count = count + 1",
        "return count",
    ]
    return f"Count the prime numbers between {start} and {end} inclusive.", _function(lines)


def _letter_counting(item: dict[str, Any]) -> tuple[str, str] | None:
    letter, text = item["metadata"]["target_letter"], " ".join(item["metadata"]["span"])
    statement = f'How many times does the letter "{letter}" appear in "{text}"?'
    lines = [f"text = {text!r}", f"count = text.lower().count({letter!r})", "return count"]
    return statement, _function(lines)


def _bitwise(item: dict[str, Any]) -> tuple[str, str] | None:
    problem = item["metadata"]["problem"]
    return f"Calculate {problem} as an integer.", _function([f"result = {problem}", "return result"])


def _number_format(item: dict[str, Any]) -> tuple[str, str] | None:
    meta = item["metadata"]
    written = [str(c) for c in meta["formatted_candidates"]]
    pick = "max" if meta["size"] == "largest" else "min"
    statement = f"Pick the {meta['size']} of these numbers: {'; '.join(written)}."
    lines = [
        f"written = {written!r}",
        'numbers = [float(text.replace(",", "")) for text in written]',
        f"result = {pick}(numbers)",
        "return result",
    ]
    return statement, _function(lines)


BUILDERS: dict[str, Builder] = {
    "basic_arithmetic": _arithmetic,
    "chain_sum": _arithmetic,
    "decimal_chain_sum": _arithmetic,
    "products": _arithmetic,
    "decimal_arithmetic": _decimal_arithmetic,
    "simple_equations": _simple_equation,
    "gcd": _gcd,
    "lcm": _lcm,
    "count_bits": _count_bits,
    "count_primes": _count_primes,
    "letter_counting": _letter_counting,
    "bitwise_arithmetic": _bitwise,
    "number_format": _number_format,
}
"""reasoning-gym generator → how its items become programs (one per generator, drawn in turn)."""

GENERATOR_OPTIONS: dict[str, dict[str, Any]] = {
    # Two to four operands of up to three digits: the scale of the composite task's programs.
    "basic_arithmetic": {"min_terms": 2, "max_terms": 4, "max_digits": 3},
    "chain_sum": {"min_terms": 2, "max_terms": 4, "max_digits": 3},
    "decimal_chain_sum": {"min_terms": 2, "max_terms": 4, "max_digits": 3, "max_decimal_places": 2},
    "products": {"max_digits": 4},
    "decimal_arithmetic": {"min_num_decimal_places": 2, "max_num_decimal_places": 2, "max_terms": 4},
    "count_bits": {"max_n": 100_000},
    "count_primes": {"max_n": 2_000},
    "letter_counting": {"max_words": 8},
    "number_format": {"max_num_candidates": 3, "max_n": 100_000},
}
"""Sizes kept small so that records stay short and numbers stay in the composite task's range."""


def _answer(item: dict[str, Any], generator: str) -> int | float | None:
    answer = item["answer"]
    if generator == "bitwise_arithmetic":
        try:
            return int(answer, 16)
        except ValueError:
            return None
    try:
        value = float(answer)
    except ValueError:
        return None
    if not math.isfinite(value):
        return None
    return int(value) if value.is_integer() else value


def candidates(seed: int, per_generator: int) -> Iterator[ProceduralProgram]:
    """Programs from every generator of ``BUILDERS`` in turn (one seeded stream per generator),
    unchecked: :func:`checked_programs` runs them."""
    gym = reasoning_gym()
    streams = []
    for offset, name in enumerate(BUILDERS):
        options = GENERATOR_OPTIONS.get(name, {})
        dataset = gym.create_dataset(name, size=per_generator, seed=seed * 1009 + offset, **options)
        streams.append((name, [dataset[i] for i in range(len(dataset))]))
    for items in zip(*(stream for _, stream in streams), strict=True):
        for (name, _), item in zip(streams, items, strict=True):
            built, value = BUILDERS[name](item), _answer(item, name)
            if built is not None and value is not None:
                yield ProceduralProgram(name, built[0], built[1], value)


def checked_programs(programs: list[ProceduralProgram], *, chunk: int = 200) -> list[ProceduralProgram]:
    """The programs whose ``solution()``, run in the sandbox, returns their answer (to 1e-6 relative).

    The programs are ours (built from ground truth), but they are code: they run in the sandbox,
    ``chunk`` at a time in one process (each its own function, its error its own), since one sandbox
    start per program would make drawing thousands of records take many minutes.
    """
    from lorasoup.evaluation.sandbox import SandboxLimits, run_programs

    groups = [programs[start : start + chunk] for start in range(0, len(programs), chunk)]
    runs = run_programs(
        [_batched(group) for group in groups], call="solution", limits=SandboxLimits(timeout_s=30.0, cpu_s=30)
    )
    kept = []
    for group, run in zip(groups, runs, strict=True):
        if run.verdict != "ok" or run.returned is None:
            continue  # the whole chunk is left out; a chunk that times out holds a runaway program
        for program, returned in zip(group, json.loads(run.returned), strict=True):
            if returned is not None and math.isclose(returned, program.value, rel_tol=1e-6, abs_tol=1e-9):
                kept.append(program)
    return kept


def _batched(group: list[ProceduralProgram]) -> str:
    """One program that defines each of ``group`` as ``solution_<i>`` and returns all their values
    (None for one that raised or returned no number) as JSON."""
    parts = [p.program.replace("def solution():", f"def solution_{i}():", 1) for i, p in enumerate(group)]
    runner = f"""
def solution():
    import json
    values = []
    for index in range({len(group)}):
        try:
            value = globals()[f"solution_{{index}}"]()
            number = isinstance(value, int | float) and not isinstance(value, bool)
            values.append(float(value) if number else None)
        except Exception:
            values.append(None)
    return json.dumps(values)
"""
    return "\n\n".join(parts) + "\n" + runner


def code_record(program: ProceduralProgram) -> dict[str, Any]:
    return {
        "instruction": f"{program.statement}\n{PROGRAM_REQUEST}",
        "output": fenced(program.program),
        "value": program.value,
        "task": program.generator,
    }


def procedural_code_split(
    seed: int,
    count: int,
    fits: Callable[[dict[str, Any]], bool],
    *,
    test: bool = False,
    exclude: set[str] = frozenset(),
) -> list[dict[str, Any]]:
    """``count`` checked code records of the study's ``seed``, balanced over the generators, each within
    the token budget (``fits``) and none whose instruction is in ``exclude``. Training and test records
    of one seed come from different reasoning-gym streams (``test``)."""
    per_generator = math.ceil(count / len(BUILDERS) * 1.25) + 8  # spare for filters and duplicates
    drawn = list(candidates(2 * seed + int(test), per_generator))
    records, seen = [], set(exclude)
    for program in checked_programs(drawn):
        record = code_record(program)
        if record["instruction"] not in seen and fits(record):
            seen.add(record["instruction"])
            records.append(record)
    if len(records) < count:
        raise DataError(
            f"only {len(records)} of {count} procedural code records could be built; "
            "lower sizes.skill / sizes.test, or raise cutoff_len"
        )
    random.Random(seed).shuffle(records)
    # Balanced: one record per generator in turn (generators with fewer usable records run out first);
    # the seeded shuffle decides which of a generator's records are taken.
    by_generator: dict[str, list[dict[str, Any]]] = {}
    for record in records:
        by_generator.setdefault(record["task"], []).append(record)
    chosen: list[dict[str, Any]] = []
    while len(chosen) < count:
        for group in by_generator.values():
            if group and len(chosen) < count:
                chosen.append(group.pop())
    return chosen
