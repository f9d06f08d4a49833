"""What an accuracy-vs-rank sweep scores on: a model, a tokenizer, a task and its examples.

For a CAT run: ``--task`` and ``--data`` as ``lorasoup eval`` takes them, on the run's base model
(``--base-model`` overrides it). An application whose runs carry their own task (the demo) passes a
:data:`SweepProvider` for its run kind to ``build_report`` (``sweep_inputs={"demo": ...}``): the library
never imports the application.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from lorasoup.devices import default_device
from lorasoup.errors import ConfigError
from lorasoup.report.runs import Run


@dataclass
class SweepInputs:
    model: Any
    tokenizer: Any
    task: Any
    examples: list[Any]
    settings: Any
    sandbox: Any = None


SweepProvider = Callable[[Run, Run], SweepInputs]
"""``(parent run, CAT run) -> SweepInputs`` for the CAT runs inside a parent run of one kind."""


def task_sweep_inputs(config: Any, cat_run: Run) -> SweepInputs:
    """``config.task`` on ``config.data`` (``ReportConfig``), on the CAT run's base model."""
    from lorasoup.evaluation.runner import task_settings
    from lorasoup.evaluation.tasks import Task, get_task_spec, resolve_inputs
    from lorasoup.models import load_base_model, load_tokenizer, parse_model_spec

    spec = get_task_spec(config.task)
    inputs = resolve_inputs(spec, config.data, config.fewshot, None)
    task = Task.from_inputs(spec, inputs)
    examples = task.load(inputs.data, limit=config.limit)
    settings = task_settings(task)
    if config.batch_size is not None:
        settings = dataclasses.replace(settings, batch_size=config.batch_size)
    base = config.base_model or _recorded_base(cat_run)
    model_spec = parse_model_spec(base)
    device = default_device(config.device)
    return SweepInputs(
        model=load_base_model(model_spec, device=device),
        tokenizer=load_tokenizer(model_spec, padding_side="left"),
        task=task,
        examples=examples,
        settings=settings,
    )


def _recorded_base(run: Run) -> str:
    recorded = run.config.get("base_model")
    if not recorded:
        raise ConfigError(f"{run.path}/run.json names no base model; pass --base-model")
    found = run.locate(str(recorded))
    return str(found) if found is not None else str(recorded)
