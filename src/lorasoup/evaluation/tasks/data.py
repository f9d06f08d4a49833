"""Evaluation data: read rows from files, turn each into an :class:`Example` through a loader hook.

Files are ``.json`` (a list of objects) or ``.jsonl`` (one object per line). Each file is a *subset*
of the run, named by its stem (or ``parent/stem`` where two stems collide); an example's id is
``subset/row`` (row counted from 0 in its file), unique within a run, which is what resume keys on.

Loader hooks (``LOADERS``), ``(row, where, spec) -> (fields, reference, notes)``:

* ``records`` — any object; the reference is the field ``spec.reference``; all fields format prompts.
* ``gsm-hard`` — ``instruction`` and a numeric ``answer`` (GSM-Hard stores floats; 303 of its 1319
  answers are not integers); the reference is kept as a number.
* ``qa`` — the QABot files, closed-book: ``instruction`` is the question and ``answer`` the reference,
  whichever of the layouts a row has (the biology file mixes three: ``{instruction, answer, context}``,
  ``{instruction, input, output, answer}``, ``{instruction, output, answer}``; the D&D file has
  ``{instruction, output, answer, context}``). A row without ``answer`` takes it from an ``output``
  of the form "The correct answer is X". The layout is noted per example; contexts are never shown.
  The field ``question`` repeats ``instruction`` (the task's ``question``: the echo baseline).
* ``rc`` — ``records``, plus the field ``question``: the instruction's text after its last
  "Question:" (the instruction holds the context, then the question).
* ``prompt-format`` — the FormatSpread task161 files: the reference ``"answerN"`` becomes ``N``.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lorasoup.errors import ConfigError, DataError
from lorasoup.registry import Registry

if TYPE_CHECKING:
    from lorasoup.evaluation.tasks.spec import TaskSpec


@dataclass(frozen=True)
class Example:
    """One item to evaluate: prompt fields, the reference answer, and where it came from."""

    id: str
    subset: str
    index: int
    fields: Mapping[str, Any]
    reference: Any
    notes: Mapping[str, Any] = field(default_factory=dict)


Loader = Callable[[Mapping[str, Any], str, "TaskSpec"], tuple[dict[str, Any], Any, dict[str, Any]]]

LOADERS: Registry[Loader] = Registry("task loader")

_ANSWER_N = re.compile(r"answer\s*(-?\d+)", re.IGNORECASE)
_QUESTION_MARKER = "Question:"
_CORRECT_ANSWER = re.compile(r"^\s*the correct answer is\s*", re.IGNORECASE)


def read_rows(path: Path) -> list[dict[str, Any]]:
    """The objects of a ``.json`` list or a ``.jsonl`` file; errors name the file and the row."""
    if not path.is_file():
        raise DataError(f"{path}: file not found; pass an existing .json or .jsonl file")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError:
        raise DataError(f"{path}: not UTF-8 text") from None
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        rows = []
        for number, line in enumerate(text.splitlines(), start=1):
            if line.strip():
                rows.append(_decode(line, f"{path}: line {number}"))
    elif suffix == ".json":
        rows = _decode(text, str(path))
        if not isinstance(rows, list):
            raise DataError(f"{path}: expected a JSON list of objects at the top level")
    else:
        raise DataError(f"{path}: unsupported file type {suffix!r}; use .json (a list) or .jsonl")
    for number, row in enumerate(rows):
        if not isinstance(row, dict):
            raise DataError(f"{path}: row {number} is not a JSON object")
    if not rows:
        raise DataError(f"{path}: holds no rows")
    return rows


def _decode(text: str, where: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise DataError(
            f"{where}: invalid JSON ({exc.msg} at line {exc.lineno}, column {exc.colno})"
        ) from None


def subset_names(paths: Sequence[Path]) -> list[str]:
    """Each file's stem, or ``parent/stem`` for stems that two files share."""
    stems = [p.stem for p in paths]
    names = [f"{p.parent.name}/{p.stem}" if stems.count(p.stem) > 1 else p.stem for p in paths]
    if len(set(names)) != len(names):
        raise ConfigError(f"data files {', '.join(map(str, paths))} cannot be told apart; pass each once")
    return names


def load_examples(spec: TaskSpec, paths: Sequence[Path], *, limit: int | None = None) -> list[Example]:
    """Examples of every file, the first ``limit`` rows of each."""
    loader = LOADERS.get(spec.loader)
    examples: list[Example] = []
    for path, subset in zip(paths, subset_names(paths), strict=True):
        rows = read_rows(path)
        for index, row in enumerate(rows[:limit] if limit is not None else rows):
            fields, reference, notes = loader(row, f"{path}: row {index}", spec)
            examples.append(Example(f"{subset}/{index}", subset, index, fields, reference, notes))
    return examples


def examples_from_rows(
    spec: TaskSpec, rows: Sequence[Mapping[str, Any]], subset: str = "data"
) -> list[Example]:
    """Examples from rows held in memory (e.g. a demo's own data), through the task's loader."""
    loader = LOADERS.get(spec.loader)
    examples = []
    for index, row in enumerate(rows):
        fields, reference, notes = loader(row, f"{subset}: row {index}", spec)
        examples.append(Example(f"{subset}/{index}", subset, index, fields, reference, notes))
    return examples


def _text_field(row: Mapping[str, Any], name: str, where: str) -> str:
    value = row.get(name)
    if not isinstance(value, str) or not value.strip():
        keys = ", ".join(sorted(row)) or "none"
        raise DataError(f"{where}: needs a non-empty text field {name!r} (fields present: {keys})")
    return value


@LOADERS.register("records")
def records(row: Mapping[str, Any], where: str, spec: TaskSpec) -> tuple[dict[str, Any], Any, dict[str, Any]]:
    if spec.reference not in row or row[spec.reference] is None:
        keys = ", ".join(sorted(row))
        raise DataError(
            f"{where}: no reference field {spec.reference!r} (fields present: {keys}); set 'reference'"
        )
    return dict(row), row[spec.reference], {}


@LOADERS.register("gsm-hard")
def gsm_hard(
    row: Mapping[str, Any], where: str, spec: TaskSpec
) -> tuple[dict[str, Any], Any, dict[str, Any]]:
    from lorasoup.evaluation.metrics import parse_number

    _text_field(row, "instruction", where)
    answer = row.get("answer")
    if parse_number(answer) is None:
        raise DataError(f"{where}: 'answer' must be a number, got {answer!r}")
    return dict(row), float(answer) if isinstance(answer, (int, float)) else answer, {}


@LOADERS.register("qa")
def qa(row: Mapping[str, Any], where: str, spec: TaskSpec) -> tuple[dict[str, Any], Any, dict[str, Any]]:
    question = _text_field(row, "instruction", where)
    answer = row.get("answer")
    if not (isinstance(answer, str) and answer.strip()):
        output = row.get("output")
        if (
            isinstance(output, str)
            and _CORRECT_ANSWER.match(output)
            and _CORRECT_ANSWER.sub("", output).strip()
        ):
            answer = _CORRECT_ANSWER.sub("", output).strip()
        else:
            raise DataError(
                f"{where}: needs an 'answer' (or an 'output' of the form 'The correct answer is X')"
            )
    layout = "+".join(sorted(k for k in row if k != "instruction"))
    # closed-book: the prompt sees the question only, never a context
    return {"instruction": question, "question": question}, answer, {"layout": layout}


@LOADERS.register("rc")
def reading_comprehension(
    row: Mapping[str, Any], where: str, spec: TaskSpec
) -> tuple[dict[str, Any], Any, dict[str, Any]]:
    instruction = _text_field(row, "instruction", where)
    _, marker, question = instruction.rpartition(_QUESTION_MARKER)
    if not marker or not question.strip():
        raise DataError(f"{where}: the instruction has no {_QUESTION_MARKER!r} followed by the question")
    fields, reference, notes = records(row, where, spec)
    return {**fields, "question": question.strip()}, reference, notes


@LOADERS.register("prompt-format")
def prompt_format(
    row: Mapping[str, Any], where: str, spec: TaskSpec
) -> tuple[dict[str, Any], Any, dict[str, Any]]:
    _text_field(row, "instruction", where)
    label = row.get("answer")
    match = _ANSWER_N.fullmatch(label.strip()) if isinstance(label, str) else None
    if match is None:
        raise DataError(f"{where}: 'answer' must look like 'answer3', got {label!r}")
    return dict(row), match[1], {}
