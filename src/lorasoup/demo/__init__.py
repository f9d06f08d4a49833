"""The embedded default, ``lorasoup demo``: a skill-composition study that runs in minutes on a CPU.

A miniature of the LoRA Soups GSM-Hard experiment (https://arxiv.org/abs/2410.13025), built from a
seed with no download: see ``benchmark.py`` for the task design, ``study.py`` for the methods, and
docs/demo.md for what the numbers mean. The output directory (written atomically) holds:

- ``report.md`` / ``report.html``: the results table (mean ± std over seeds), the methods' bar chart
  and a heatmap of CAT's learned weights per layer and module;
- ``results.json``: every number, per seed and aggregated; ``run.json``: settings, versions, timings;
- ``seed-N/``: that seed's base model, adapters, merges, CAT artifact and per-example results
  (``eval/<method>/<task>.jsonl``) from which the table is computed.

With ``--set skills=3`` the report adds the K = 3 table and how each method scales with K
(``scaling.png``; per-example files in ``eval-k3/``); with ``--set format_robust=true`` the
format-robustness table (``formats.png``; ``eval-formats/<method>/<frame>.jsonl``). See ``tables.py``.

``model="smollm2"`` (``lorasoup demo --model smollm2``) runs the same study on the real
SmolLM2-135M-Instruct with reasoning-gym data (``real.py``, ``real_study.py``); its converted base
checkpoint is ``base/``, shared by the seeds.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lorasoup.demo.real_study import RealDemoSettings, SeedRunner, report_header, seed_runner
from lorasoup.demo.study import TASKS, DemoSettings, MethodResult, StageHook, aggregate, run_seed
from lorasoup.demo.tables import extra_results, extra_sections
from lorasoup.errors import ConfigError

__all__ = ["MODES", "DemoSettings", "DemoSummary", "RealDemoSettings", "run_demo"]


@dataclass
class DemoSummary:
    output: Path
    table: list[dict[str, Any]]
    seeds: list[int]
    seconds: float


def run_demo(
    output: str | Path,
    *,
    seed: int = 0,
    seeds: int = 1,
    settings: DemoSettings | RealDemoSettings | None = None,
    overwrite: bool = False,
    stage: StageHook | None = None,
    model: str = "tiny",
) -> DemoSummary:
    """Run the study for ``seeds`` seeds (``seed``, ``seed + 1``, ...) and write the report.

    ``model`` picks the mode (``MODES``): ``tiny`` (a base pre-trained from a seed) or ``smollm2``.
    """
    from lorasoup.artifacts import atomic_output_dir, require_free_output, run_record, write_json_atomic
    from lorasoup.demo.study import settings_record

    if model not in MODES:
        raise ConfigError(f"unknown demo model {model!r}; choose one of: {', '.join(MODES)}")
    mode = MODES[model]
    settings = settings or mode.settings()
    output = Path(output)
    require_free_output(output, overwrite=overwrite)
    started = time.perf_counter()
    chosen = [seed + i for i in range(seeds)]
    with atomic_output_dir(output, overwrite=overwrite) as staging:
        run_one = mode.runner(staging, settings, stage)
        per_seed: list[list[MethodResult]] = []
        facts: list[dict[str, Any]] = []
        for index, current in enumerate(chosen):

            def seed_stage(
                what: str, done: int, total: int, index: int = index, current: int = current
            ) -> None:
                if stage is not None:
                    stage(f"seed {current}: {what}", index * total + done, len(chosen) * total)

            folder = staging / f"seed-{current}"
            folder.mkdir()
            rows, seed_facts = run_one(folder, current, settings, seed_stage)
            per_seed.append(rows)
            facts.append(seed_facts)
        table = aggregate(per_seed)
        seconds = time.perf_counter() - started
        results = {
            "model": model,
            "tasks": list(TASKS),
            "seeds": chosen,
            "table": table,
            "per_seed": [[vars(row) for row in rows] for rows in per_seed],
            "settings": settings_record(settings),
            **extra_results(table, facts, settings),  # K = 3 and format rows, when they ran
        }
        write_json_atomic(staging / "results.json", results)
        _write_report(staging, table, chosen, settings, facts, seconds, header=mode.header, results=results)
        record = run_record(
            command="demo",
            config=settings_record(settings),
            seed=seed,
            timings={
                "total": seconds,
                **{f"seed_{f['seed']}_{k}": v for f in facts for k, v in f["timings_s"].items()},
            },
            seeds=chosen,
            model=model,
            base_models=[f["base_model"] for f in facts],
        )
        write_json_atomic(staging / "run.json", record)
    return DemoSummary(output=output, table=table, seeds=chosen, seconds=seconds)


def _cell(value: dict[str, Any], seeds: int) -> str:
    mean = f"{100 * value['mean']:.1f}"
    return f"{mean} ± {100 * value['std']:.1f}" if seeds > 1 else mean


def _tiny_header(
    seeds: list[int], settings: DemoSettings, facts: list[dict[str, Any]], seconds: float
) -> list[str]:
    """The tiny study's title and the paragraph that says what was run."""
    base = settings.base
    return [
        "# lorasoup demo: composing a math skill and a code skill",
        "",
        "Composite task: a multiplication word problem answered by a Python program that defines "
        "`solution()`, run in the sandbox. The math skill LoRA knows multiplication stories but "
        "writes `answer : a * b`; the code skill LoRA writes `def solution ( ) : return ...` but "
        "has never seen a multiplication story. See docs/demo.md for the design.",
        "",
        f"Seeds: {', '.join(map(str, seeds))}. Base model: Llama, {base.layers} layers, "
        f"hidden {base.hidden}, "
        f"{facts[0]['base_model']['parameters']:,} parameters, pre-trained {base.steps} steps. "
        f"Skill LoRAs r={settings.lora_rank}, {settings.lora_steps} steps. Test sets: "
        f"{settings.sizes.test} examples per task. Wall time {seconds:.0f} s.",
        "",
    ]


def _write_report(
    folder: Path,
    table: list[dict[str, Any]],
    seeds: list[int],
    settings: Any,
    facts: list[dict[str, Any]],
    seconds: float,
    header: Callable[..., list[str]] = _tiny_header,
    results: dict[str, Any] | None = None,
) -> None:
    from lorasoup.report import markdown_table, markdown_to_html, methods_bar_chart, weights_heatmap

    extra, extra_images = extra_sections(folder, results or {}, len(seeds))

    bars = methods_bar_chart(
        table, TASKS, folder / "methods.png", title=f"accuracy per method ({len(seeds)} seed(s))"
    )
    weights = json.loads(Path(facts[0]["cat_weights"]).read_text(encoding="utf-8"))
    heatmap = weights_heatmap(
        weights["weights"], folder / "cat_weights.png", title=f"CAT's learned weights (seed {seeds[0]})"
    )
    headers = ["method", "composite task (%)", "math skill (%)", "code skill (%)", "how"]
    rows = [[row["method"], *(_cell(row[t], len(seeds)) for t in TASKS), row["detail"]] for row in table]
    best = max((r for r in table if r["kind"] != "ceiling"), key=lambda r: r["composite"]["mean"])
    cat = next(r for r in table if r["method"] == "CAT (trained)")
    mix = next(r for r in table if r["method"] == "DATA-MIX")
    text = "\n".join(
        [
            *header(seeds, settings, facts, seconds),
            markdown_table(headers, rows),
            f"Best composition (oracle excluded): **{best['method']}**, "
            f"{100 * best['composite']['mean']:.1f} % on the composite task. "
            f"CAT (trained): {100 * cat['composite']['mean']:.1f} %; "
            f"DATA-MIX: {100 * mix['composite']['mean']:.1f} %.",
            "",
            "![accuracy per method](methods.png)",
            "",
            "![CAT weights](cat_weights.png)",
            "",
            *extra,
        ]
    )
    (folder / "report.md").write_text(text, encoding="utf-8")
    page = markdown_to_html(
        text,
        title="lorasoup demo",
        images={"methods.png": bars, "cat_weights.png": heatmap, **extra_images},
    )
    (folder / "report.html").write_text(page, encoding="utf-8")


@dataclass(frozen=True)
class DemoMode:
    """One ``--model`` choice: its settings class, how a run prepares its seeds, its report header.

    ``runner(output folder, settings, stage)`` does the work the seeds share (the smollm2 mode
    converts the base model once) and returns ``run(seed folder, seed, settings, stage)``.
    """

    settings: type
    runner: Callable[[Path, Any, StageHook | None], SeedRunner]
    header: Callable[..., list[str]]


MODES: dict[str, DemoMode] = {
    "tiny": DemoMode(DemoSettings, lambda folder, settings, stage: run_seed, _tiny_header),
    "smollm2": DemoMode(RealDemoSettings, seed_runner, report_header),
}
