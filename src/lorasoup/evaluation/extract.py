"""Answer extractors: from a model's generated text to the part a metric scores.

Every extractor is ``(text) -> str | None`` (``None``: nothing to score) and lives in the
``EXTRACTORS`` registry, so a task names it (``extractor: last_number``):

* ``program`` — a PAL-style program (https://arxiv.org/abs/2211.10435): the first fenced code block
  that defines ``solution`` (```` ```python ```` or a bare ```` ``` ````; an unclosed last block counts,
  as a stop string may end the text inside it), else the first fenced block, else a bare
  ``def solution`` block with the import lines just above it.
* ``last_number`` / ``first_number`` — a number written in the text: thousands commas (``1,234``),
  signs (``-`` or ``−``), decimals, scientific notation (``1.5e10``) and fractions (``3/4``),
  returned in plain form (``-1234.5``, ``3/4``); the reference scorer took the last number.
* ``answer_phrase`` — what follows "the correct answer is" (the QA/RC demos' answer form) up to a
  blank line, else the first paragraph of the text.
* ``answer_number`` — the first number after "the correct answer is", else the last number.
* ``first_line`` — the first non-empty line; ``strip`` — the whole text without outer whitespace.
"""

from __future__ import annotations

import re
from collections.abc import Callable

from lorasoup.registry import Registry

Extractor = Callable[[str], "str | None"]

EXTRACTORS: Registry[Extractor] = Registry("answer extractor")

_FENCE = re.compile(r"```[ \t]*[\w+.-]*[ \t]*\n(.*?)(?:```|\Z)", re.DOTALL)
_DEF_SOLUTION = re.compile(r"^([ \t]*)def[ \t]+solution[ \t]*\(", re.MULTILINE)
_IMPORT = re.compile(r"^(?:import|from)[ \t]+\w")
_NUMBER = re.compile(
    r"""
    (?<![\w.])                                  # not glued to a word or a decimal point
    (?P<sign>[-−]?)
    (?P<body>(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|\.\d+)
    (?P<exp>[eE][-+]?\d+)?
    (?:[ \t]*/[ \t]*(?P<den>\d+)(?!\.?\d))?   # a fraction's denominator
    (?!\.?\d)                                  # not cut out of a longer number
    """,
    re.VERBOSE,
)
_PHRASE = re.compile(r"(?:the\s+)?correct\s+answer\s+is\s*:?\s*", re.IGNORECASE)


@EXTRACTORS.register("program")
def extract_program(text: str) -> str | None:
    """The program a generation wrote (see the module doc); ``None`` when it wrote none."""
    blocks = [b.strip("\n") for b in _FENCE.findall(text)]
    blocks = [b for b in blocks if b.strip()]
    for block in blocks:
        if _DEF_SOLUTION.search(block):
            return block + "\n"
    if blocks:
        return blocks[0] + "\n"
    return _bare_solution(text)


def _bare_solution(text: str) -> str | None:
    """``def solution`` and its indented body, with the import lines right above it."""
    match = _DEF_SOLUTION.search(text)
    if match is None:
        return None
    lines = text[match.start() :].splitlines()
    indent = len(match.group(1))
    body = [lines[0][indent:]]
    for line in lines[1:]:
        if line.strip() and len(line) - len(line.lstrip()) <= indent:
            break
        body.append(line[indent:] if line.strip() else "")
    before = text[: match.start()].splitlines()
    imports: list[str] = []
    while before and (_IMPORT.match(before[-1].strip()) or not before[-1].strip()):
        line = before.pop().strip()
        if line:
            imports.insert(0, line)
    return "\n".join([*imports, *body]).rstrip() + "\n"


def numbers_in(text: str) -> list[str]:
    """Every number in ``text``, in order, in plain form (no commas, ASCII minus, ``a/b`` fractions)."""
    found = []
    for match in _NUMBER.finditer(text):
        sign = "-" if match["sign"] else ""
        number = sign + match["body"].replace(",", "") + (match["exp"] or "")
        if match["den"] is not None:
            number += "/" + match["den"]
        found.append(number)
    return found


@EXTRACTORS.register("last_number")
def last_number(text: str) -> str | None:
    numbers = numbers_in(text)
    return numbers[-1] if numbers else None


@EXTRACTORS.register("first_number")
def first_number(text: str) -> str | None:
    numbers = numbers_in(text)
    return numbers[0] if numbers else None


@EXTRACTORS.register("answer_phrase")
def answer_phrase(text: str) -> str | None:
    """The answer after "the correct answer is", to the end of its paragraph; else the first paragraph."""
    match = _PHRASE.search(text)
    rest = text[match.end() :] if match else text
    paragraph = re.split(r"\n\s*\n", rest.strip(), maxsplit=1)[0].strip()
    return paragraph or None


@EXTRACTORS.register("answer_number")
def answer_number(text: str) -> str | None:
    match = _PHRASE.search(text)
    if match is not None:
        found = first_number(text[match.end() :])
        if found is not None:
            return found
    return last_number(text)


@EXTRACTORS.register("first_line")
def first_line(text: str) -> str | None:
    return next((line.strip() for line in text.splitlines() if line.strip()), None)


@EXTRACTORS.register("strip")
def strip(text: str) -> str | None:
    return text.strip() or None
