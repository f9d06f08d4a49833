"""Evaluation tasks: the registry of task specs, and :class:`Task`, which builds prompts and scores.

Built-in tasks are the YAML files beside this module (``gsm-hard``, ``qa``, ``rc``,
``prompt-formats``), read on first use; a path to a ``.yaml`` file names a custom task, and
``register_task`` adds one from code. See ``spec.py`` for what a spec holds and docs/evaluation.md.
"""

from __future__ import annotations

import functools
import string
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lorasoup.errors import ConfigError, DataError
from lorasoup.evaluation.tasks.data import Example, examples_from_rows, load_examples, read_rows
from lorasoup.evaluation.tasks.scoring import PROGRAM_SCORERS, SCORERS, SandboxOptions, Scored
from lorasoup.evaluation.tasks.spec import FewShotSpec, TaskSpec, load_task_spec
from lorasoup.registry import Registry

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from lorasoup.evaluation.sandbox import ProgramCache

__all__ = [
    "Example",
    "FewShotSpec",
    "SandboxOptions",
    "Scored",
    "Task",
    "TaskInputs",
    "TaskSpec",
    "get_task_spec",
    "register_task",
    "resolve_inputs",
    "task_names",
]

_BUILTIN_DIR = Path(__file__).parent


@functools.cache
def _registry() -> Registry[TaskSpec]:
    registry: Registry[TaskSpec] = Registry("task")
    for path in sorted(_BUILTIN_DIR.glob("*.yaml")):
        spec = load_task_spec(path, builtin=True)
        registry.add(spec.name, spec)
    return registry


def task_names() -> list[str]:
    return _registry().names()


def register_task(spec: TaskSpec) -> TaskSpec:
    """Add a task for this process (duplicates raise); ``get_task_spec(spec.name)`` then finds it."""
    spec.validate()
    return _registry().add(spec.name, spec)


def get_task_spec(name_or_path: str | Path) -> TaskSpec:
    """A registered task by name, or a custom task from a ``.yaml`` file."""
    text = str(name_or_path)
    if text.endswith((".yaml", ".yml")):
        if not Path(text).is_file():
            raise ConfigError(f"task file {text} does not exist")
        return load_task_spec(text)
    return _registry().get(text)


@dataclass(frozen=True)
class TaskInputs:
    """The files a run reads: the data files (one subset each) and the few-shot demos, if any."""

    data: list[Path]
    fewshot: Path | None


def resolve_inputs(
    spec: TaskSpec,
    data: Sequence[str | Path] = (),
    fewshot: str | Path | None = None,
    num_fewshot: int | None = None,
) -> TaskInputs:
    """Where to read: ``data`` files as given, or the spec's paths under ``data`` (one directory) or the
    spec's ``data_root``; the demos from ``fewshot`` or the spec's ``fewshot.path`` under that root."""
    given = [Path(d).expanduser() for d in data]
    directory = given[0] if len(given) == 1 and given[0].is_dir() else None
    data_root = Path(spec.data_root) if spec.data_root else None
    root = directory or (None if given else data_root)
    if given and directory is None:
        files = given
    elif root is not None and spec.data:
        files = [root / relative for relative in spec.data]
    else:
        listed = f" (the task expects {', '.join(spec.data)} under it)" if spec.data else ""
        raise ConfigError(
            f"task {spec.name!r} needs data: pass --data FILE (repeatable) or --data DIR{listed}"
        )
    for path in files:
        if not path.is_file():
            raise DataError(f"data file {path} does not exist; check --data")
    wanted = spec.fewshot.num if num_fewshot is None else num_fewshot
    if fewshot is not None or wanted == 0 or spec.fewshot.path is None:
        demos = Path(fewshot).expanduser() if fewshot is not None and wanted != 0 else None
    elif (directory or data_root) is not None:
        demos = (directory or data_root) / spec.fewshot.path
    else:
        raise ConfigError(
            f"task {spec.name!r} puts few-shot demos ({spec.fewshot.path}) before each question: pass "
            "--fewshot FILE, or --data DIR holding both, or --set num_fewshot=0"
        )
    if demos is not None and not demos.is_file():
        raise DataError(f"few-shot file {demos} does not exist; check --fewshot or --data")
    return TaskInputs(files, demos)


class Task:
    """A spec made ready to run: few-shot prefix rendered once, hooks looked up, prompts per example."""

    def __init__(
        self, spec: TaskSpec, demos: Sequence[Mapping[str, Any]] = (), num_fewshot: int | None = None
    ):
        spec.validate()
        self.spec = spec
        wanted = spec.fewshot.num if num_fewshot is None else num_fewshot
        if spec.fewshot.path is not None and not demos and wanted != 0:
            raise ConfigError(
                f"task {spec.name!r} puts few-shot demos ({spec.fewshot.path}) before each question; "
                "build it with Task.from_inputs(spec, resolve_inputs(spec, data, fewshot)), "
                "or pass num_fewshot=0"
            )
        self.demos = list(demos)[:wanted] if wanted is not None else list(demos)
        self.scorer = SCORERS.get(spec.scorer)
        parts = [spec.fewshot.header]
        parts += [render(spec.fewshot.demo, row, f"few-shot demo {i}") for i, row in enumerate(self.demos)]
        self.prefix = "".join(parts) + spec.fewshot.footer

    @classmethod
    def from_inputs(cls, spec: TaskSpec, inputs: TaskInputs, num_fewshot: int | None = None) -> Task:
        demos = read_rows(inputs.fewshot) if inputs.fewshot is not None else []
        return cls(spec, demos, num_fewshot)

    @property
    def name(self) -> str:
        return self.spec.name

    def load(self, paths: Sequence[Path], limit: int | None = None) -> list[Example]:
        return self.check(load_examples(self.spec, paths, limit=limit))

    def examples(self, rows: Sequence[Mapping[str, Any]], subset: str = "data") -> list[Example]:
        return self.check(examples_from_rows(self.spec, rows, subset))

    def check(self, examples: Sequence[Example]) -> list[Example]:
        """Render every example's query and find its question, so that a typo in the prompt
        (``{qestion}``) or a missing field stops the run here, before any model loads."""
        for example in examples:
            render(self.spec.prompt, example.fields, f"example {example.id}")
            question = self.spec.question
            if question is not None and not isinstance(example.fields.get(question), str):
                present = ", ".join(sorted(example.fields)) or "none"
                raise DataError(
                    f"example {example.id}: task {self.name!r} reads the question from field {question!r}, "
                    f"which it lacks (fields: {present}); fix 'question' in the task"
                )
        return list(examples)

    def prompt(self, example: Example, tokenizer: PreTrainedTokenizerBase | None = None) -> str:
        """Few-shot prefix + query; wrapped whole by the spec's training template, if it names one."""
        body = self.prefix + render(self.spec.prompt, example.fields, f"example {example.id}")
        if self.spec.template == "none":
            return body
        from lorasoup.training.templates import TEMPLATES

        prompt, _ = TEMPLATES.get(self.spec.template)(
            {"instruction": body, "input": "", "output": ""}, tokenizer
        )
        return prompt

    def score(
        self,
        examples: Sequence[Example],
        texts: Sequence[str],
        options: SandboxOptions | None = None,
        cache: ProgramCache | None = None,
    ) -> list[Scored]:
        """Score ``texts``; ``cache`` (program-running scorers only) keeps programs' results across calls."""
        if cache is not None and self.spec.scorer in PROGRAM_SCORERS:
            return self.scorer(self.spec, examples, texts, options or SandboxOptions(), cache)
        return self.scorer(self.spec, examples, texts, options or SandboxOptions())


def render(template: str, fields: Mapping[str, Any], where: str) -> str:
    """``template.format(**fields)`` with one-line errors naming the missing field."""
    try:
        return string.Formatter().vformat(template, (), dict(fields))
    except KeyError as exc:
        present = ", ".join(sorted(fields)) or "none"
        raise DataError(
            f"{where}: the prompt uses {{{exc.args[0]}}} but there is no such field (fields: {present}); "
            "fix the task's prompt or the data"
        ) from None
    except (IndexError, ValueError) as exc:
        raise ConfigError(
            f"prompt template {template[:40]!r}...: {exc}; write literal braces as {{{{ and }}}}"
        ) from None
