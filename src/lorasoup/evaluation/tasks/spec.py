"""Task specs: what a task is, as data (YAML), in the spirit of lm-evaluation-harness task configs.

A spec names its parts; code enters only through registered hooks named in it:

* ``loader`` (``LOADERS``): one dataset row → prompt fields, reference answer, notes;
* ``scorer`` (``SCORERS``): generations → verdicts and scores (``answer``: extractor + metrics;
  ``program``: run the extracted program in the sandbox);
* ``extractor`` (``EXTRACTORS``) and ``metric`` / ``extra_metrics`` (``METRICS``).

``metric`` decides ``correct`` (score above ``threshold``): the run's accuracy. ``headline`` names the
score reports lead with (``accuracy`` or one of the metrics). ``question`` names the field holding the
question: metrics marked ``reads_question`` (``novel_token_f1``) discount its words, and every example
is also scored with the question itself as the answer, the question-echo baseline of the reports.

The prompt of an example is ``fewshot.header + demos + fewshot.footer + query``, where the query is
``prompt`` formatted with the row's fields (``{instruction}``), then wrapped by a training template
when ``template`` names one (``alpaca``, ``plain``, ``chat``; ``none`` leaves it as is). Each demo is
``fewshot.demo`` formatted with a demo row's fields. Literal braces in these strings are doubled
(``{{``), as in ``str.format``.

Relative paths (``data``, ``fewshot.path``) are resolved against ``--data DIR`` when the user gives
a directory, else against ``data_root`` (a custom task's YAML folder); built-in tasks have no
``data_root``, so they read nothing unless the user passes data.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from lorasoup.config import load_config, require
from lorasoup.evaluation.generate import GenerationOptions

INSTRUCTION_RESPONSE = "### Instruction:\n{instruction}\n\n### Response:\n"
"""The query and demo frame of the LoRA Soups few-shot prompts (``cat_eval.py``)."""


@dataclass
class FewShotSpec:
    """Demonstrations put before the query: a file of rows, how many, and how each is written."""

    path: str | None = None
    num: int | None = None
    header: str = ""
    demo: str = INSTRUCTION_RESPONSE + "{output}\n\n"
    footer: str = ""

    def validate(self) -> None:
        require(self.num is None or self.num >= 0, f"fewshot.num must be >= 0, got {self.num}")


@dataclass
class TaskSpec:
    """One evaluation task; see the module doc and docs/evaluation.md."""

    name: str
    description: str = ""
    data: list[str] = field(default_factory=list)
    data_root: str | None = None
    loader: str = "records"
    prompt: str = "{instruction}"
    template: str = "none"
    fewshot: FewShotSpec = field(default_factory=FewShotSpec)
    reference: str = "answer"
    extractor: str = "strip"
    metric: str = "exact_match"
    metric_args: Any = None
    threshold: float = 0.5
    extra_metrics: list[str] = field(default_factory=list)
    headline: str = "accuracy"
    question: str | None = None
    scorer: str = "answer"
    generation: GenerationOptions = field(default_factory=GenerationOptions)

    def validate(self) -> None:
        from lorasoup.evaluation.extract import EXTRACTORS
        from lorasoup.evaluation.metrics import METRICS, reads_question
        from lorasoup.evaluation.tasks.data import LOADERS
        from lorasoup.evaluation.tasks.scoring import SCORERS
        from lorasoup.training.templates import TEMPLATES

        for registry, name in (
            (LOADERS, self.loader),
            (SCORERS, self.scorer),
            (EXTRACTORS, self.extractor),
            *((METRICS, m) for m in (self.metric, *self.extra_metrics)),
        ):
            require(name in registry, f"task {self.name!r}: {registry.unknown_message(name)}")
        require(
            self.template == "none" or self.template in TEMPLATES,
            f"task {self.name!r}: template {self.template!r} is not 'none' or one of {TEMPLATES.names()}",
        )
        require(
            self.metric_args is None or isinstance(self.metric_args, dict),
            f"task {self.name!r}: metric_args must be a mapping of argument names to values",
        )
        require(self.metric not in self.extra_metrics, f"task {self.name!r}: {self.metric!r} listed twice")
        require(
            self.headline in ("accuracy", *self.metric_names),
            f"task {self.name!r}: headline {self.headline!r} is not 'accuracy' or one of {self.metric_names}",
        )
        needs_question = [m for m in self.metric_names if reads_question(METRICS.get(m))]
        require(
            self.question is not None or not needs_question,
            f"task {self.name!r}: {', '.join(needs_question)} reads the question; name its field in "
            "'question'",
        )
        require(
            self.question is None or self.scorer == "answer",
            f"task {self.name!r}: 'question' (the echo baseline) needs scorer 'answer', not {self.scorer!r}",
        )

    @property
    def metric_names(self) -> list[str]:
        return [self.metric, *self.extra_metrics]


def load_task_spec(path: str | Path, *, builtin: bool = False) -> TaskSpec:
    """Read a task YAML strictly (unknown keys are errors); a custom task's paths are relative to it."""
    spec = load_config(TaskSpec, path)
    if builtin:
        return spec
    folder = Path(path).resolve().parent
    return replace(spec, data_root=str(folder / (spec.data_root or ".")))
