"""The real-model study's code skill: programs for stated computations, checked in the sandbox."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lorasoup.demo.procedural import BUILDERS, expression_steps, procedural_code_split

numbers = st.one_of(st.integers(-999, 999).map(str), st.decimals(-99, 99, places=2).map(str))


@st.composite
def expressions(draw: st.DrawFn, depth: int = 3) -> str:
    if depth == 0 or draw(st.booleans()):
        return draw(numbers)
    left, right = draw(expressions(depth=depth - 1)), draw(expressions(depth=depth - 1))
    negation = draw(st.sampled_from(["", "-"]))  # reasoning-gym writes -( a - b )
    return f"{negation}( {left} {draw(st.sampled_from('+-*'))} {right} )"


@given(expressions())
@settings(max_examples=200, deadline=None)
def test_expression_steps_compute_the_expression(expression: str) -> None:
    steps = expression_steps(expression)
    if steps is None:  # a bare number: no operation to write
        assert "(" not in expression
        return
    assert steps[-1] == "return result" and steps[-2].startswith("result = ")
    scope: dict = {}
    exec("def solution():\n" + "".join(f"    {line}\n" for line in steps), scope)
    assert scope["solution"]() == pytest.approx(eval(expression), rel=1e-12, abs=1e-12)


def test_expression_steps_refuse_what_is_not_arithmetic() -> None:
    assert expression_steps("2 ** 10") is None
    assert expression_steps("x + 1") is None
    assert expression_steps("1 +") is None


def test_code_split_is_checked_balanced_and_disjoint() -> None:
    train = procedural_code_split(0, 26, lambda record: True)
    exclude = {r["instruction"] for r in train}
    test = procedural_code_split(0, 13, lambda record: True, test=True, exclude=exclude)
    assert len(train) == 26 and len(test) == 13
    assert not {r["instruction"] for r in train} & {r["instruction"] for r in test}
    assert {r["task"] for r in train} == set(BUILDERS)  # two of each generator
    for record in train:
        assert record["output"].startswith("```python\n") and "def solution():" in record["output"]
        assert record["instruction"].endswith("define solution() and return the answer.")
    # Same seed, same records (reproducible studies).
    assert procedural_code_split(0, 26, lambda record: True) == train


def test_records_over_the_token_budget_are_left_out() -> None:
    short = procedural_code_split(0, 5, lambda record: len(record["output"]) < 120)
    assert all(len(r["output"]) < 120 for r in short)
