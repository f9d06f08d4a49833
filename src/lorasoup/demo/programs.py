"""What the real-model study's program records share: the request that ends every program prompt,
the code block programs are written in, a safe evaluator of arithmetic, and reasoning-gym's import."""

from __future__ import annotations

import ast
import operator
from collections.abc import Callable
from typing import Any

from lorasoup.errors import DataError

PROGRAM_REQUEST = "Write a Python program: define solution() and return the answer."
"""Ends every program prompt (code skill and composite task), so both ask for the same thing."""
INSTALL = "pip install 'lorasoup[demo]' (or: pip install reasoning-gym==0.1.25)"


def fenced(program: str) -> str:
    """A program in a Markdown code block, as the instruct model writes code; the harness's extractor
    takes the whole block (a bare program keeps only ``solution()`` and the imports above it)."""
    return f"```python\n{program}```"


_OPERATORS: dict[type, Callable[[Any, Any], Any]] = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
}


def arithmetic(source: str) -> float:
    """The value of an expression of numbers, ``+ - * /`` and parentheses; anything else raises."""

    def walk(node: ast.AST) -> float:
        if isinstance(node, ast.Constant) and type(node.value) in (int, float):
            return node.value
        if isinstance(node, ast.BinOp) and type(node.op) in _OPERATORS:
            return _OPERATORS[type(node.op)](walk(node.left), walk(node.right))
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
            return -walk(node.operand)
        raise ValueError(f"not arithmetic: {ast.dump(node)[:40]}")

    return walk(ast.parse(source, mode="eval").body)


def reasoning_gym() -> Any:
    try:
        import reasoning_gym
    except ImportError as exc:
        raise DataError(f"the smollm2 demo draws its data from reasoning-gym; install it: {INSTALL}") from exc
    return reasoning_gym
