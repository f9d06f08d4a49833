"""The demo's accuracy-vs-rank sweep inputs for ``lorasoup report``: the CLI passes
:func:`demo_sweep_inputs` to ``build_report`` for runs of kind ``demo``.

The demo's own composite task and test set are rebuilt from the seed and the settings in
``results.json`` (the benchmark is a pure function of them), on that seed's base model.
"""

from __future__ import annotations

from lorasoup.report.runs import Run
from lorasoup.report.sweep import SweepInputs


def demo_sweep_inputs(demo: Run, cat_run: Run) -> SweepInputs:
    """The demo's composite task on the CAT run's seed, scored as the demo scores it."""
    from lorasoup.config import load_config
    from lorasoup.demo.benchmark import build_benchmark, build_tokenizer
    from lorasoup.demo.scoring import Scorer
    from lorasoup.demo.settings import DemoSettings
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
