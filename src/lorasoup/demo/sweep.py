"""The demo's accuracy-vs-rank sweep inputs for ``lorasoup report``: the CLI passes
:func:`demo_sweep_inputs` to ``build_report`` for runs of kind ``demo``.

The demo's own composite task and test set are rebuilt from the seed and the settings in
``results.json`` (the benchmark is a pure function of them), on that seed's base model: the K = 3
study's CAT (``cat-k3``) on the three-skill composite, every other CAT run on the two-skill one, with
the tokenizer of the run's skills and frames.
"""

from __future__ import annotations

from lorasoup.report.runs import Run
from lorasoup.report.sweep import SweepInputs


def demo_sweep_inputs(demo: Run, cat_run: Run) -> SweepInputs:
    """The demo's composite task on the CAT run's seed, scored as the demo scores it."""
    from lorasoup.config import load_config
    from lorasoup.demo.scoring import Scorer, task_specs
    from lorasoup.demo.settings import DemoSettings
    from lorasoup.demo.study import demo_benchmark, demo_tokenizer
    from lorasoup.errors import ConfigError
    from lorasoup.evaluation.tasks import SandboxOptions
    from lorasoup.models import load_base_model, parse_model_spec

    results = demo.json("results.json")
    if results.get("model", "tiny") != "tiny":
        raise ConfigError(
            f"--rank-sweep rebuilds the tiny demo's task; {demo.path} is a --model {results['model']} run: "
            "sweep its CAT run with --task NAME_OR_YAML --data FILE instead"
        )
    settings = load_config(DemoSettings, base={**results["settings"], "device": "cpu"})  # as the model below
    seed_dir = cat_run.path.parent
    seed = int(seed_dir.name.removeprefix("seed-"))
    task = "composite3" if cat_run.path.name.endswith("-k3") else "composite"
    tokenizer = demo_tokenizer(settings)
    benchmark = demo_benchmark(seed, settings)
    scorer = Scorer(benchmark, tokenizer, settings, seed_dir / "eval", specs=task_specs((task,)))
    model = load_base_model(parse_model_spec(str(seed_dir / "base")), device="cpu")
    return SweepInputs(
        model=model,
        tokenizer=tokenizer,
        task=scorer.tasks[task],
        examples=scorer.examples[task],
        settings=scorer.settings,
        sandbox=SandboxOptions(timeout_s=2.0, memory_mb=256),
    )
