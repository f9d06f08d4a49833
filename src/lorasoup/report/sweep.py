"""What an accuracy-vs-rank sweep scores on: a model, a tokenizer, a task and its examples.

For a demo's CAT run: the demo's own composite task and test set, rebuilt from the seed and the
settings in ``results.json`` (the benchmark is a pure function of them), on that seed's base model.
For a CAT run: ``--task`` and ``--data`` as ``lorasoup eval`` takes them, on the run's base model
(``--base-model`` overrides it).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

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


def demo_sweep_inputs(demo: Run, cat_run: Run) -> SweepInputs:
    """The demo's composite task on the CAT run's seed, scored as the demo scores it."""
    from lorasoup.config import load_config
    from lorasoup.demo.benchmark import build_benchmark, build_tokenizer
    from lorasoup.demo.study import DemoSettings, Scorer
    from lorasoup.evaluation.tasks import SandboxOptions
    from lorasoup.models import load_base_model, parse_model_spec

    results = demo.json("results.json")
    settings = load_config(DemoSettings, base={**results["settings"], "device": "cpu"})  # as the model below
    seed_dir = cat_run.path.parent
    seed = int(seed_dir.name.removeprefix("seed-"))
    tokenizer = build_tokenizer()
    scorer = Scorer(build_benchmark(seed, settings.sizes), tokenizer, settings, seed_dir / "eval")
    name = "composite" if "composite" in scorer.tasks else next(iter(scorer.tasks))
    model = load_base_model(parse_model_spec(str(seed_dir / "base")), device="cpu")
    return SweepInputs(
        model=model,
        tokenizer=tokenizer,
        task=scorer.tasks[name],
        examples=scorer.examples[name],
        settings=scorer.settings,
        sandbox=SandboxOptions(timeout_s=2.0, memory_mb=256),
    )


def task_sweep_inputs(config: Any, cat_run: Run) -> SweepInputs:
    """``config.task`` on ``config.data`` (``ReportConfig``), on the CAT run's base model."""
    import torch

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
    device = config.device or ("cuda" if torch.cuda.is_available() else "cpu")
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
