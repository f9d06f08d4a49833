"""The ``lorasoup`` command: parse, load the config, make one library call, print.

Only this module configures the console and logging. Every ``LorasoupError`` becomes one red line
and exit code 2; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer
import typer.core
from rich.console import Console
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


def _fail(message: str) -> NoReturn:
    err_console.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
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
    output: Annotated[str | None, typer.Option(help="Artifact directory (overrides `output`).")] = None,
    merge: Annotated[
        bool | None, typer.Option(help="Also write merged full weights to OUTPUT/merged.")
    ] = None,
    rank_bucket: Annotated[
        str | None, typer.Option(help="'vllm' pads the rank with zero rows to vLLM's next bucket.")
    ] = None,
    resume_from: Annotated[
        str | None, typer.Option(help="A checkpoint directory (OUTPUT.checkpoints/step-N).")
    ] = None,
    overwrite: Annotated[bool, typer.Option(help="Replace OUTPUT if it exists.")] = False,
) -> None:
    """Compose adapters by CAT (learnable concatenation) and export a plain PEFT adapter.

    Learns one weight per adapter per module (or per layer, or global) on your data with base and
    adapters frozen, then writes OUTPUT/ atomically: a PEFT adapter with the weights folded in
    (r = lora_alpha = sum of ranks), cat_weights.json and run.json. See configs/cat-example.yaml.
    """
    from lorasoup.cat.config import CatRunConfig
    from lorasoup.cat.run import run_cat
    from lorasoup.config import load_config

    overrides = list(set_ or [])
    flags: dict[str, Any] = {
        "output": output,
        "export.merge": merge,
        "export.rank_bucket": rank_bucket,
        "resume_from": resume_from,
        "overwrite": overwrite or None,
    }
    overrides += [f"{key}={value}" for key, value in flags.items() if value is not None]
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
    output: Annotated[Path, typer.Option(help="Where the demo writes its runs.")] = Path("runs/demo"),
    seed: Annotated[int, typer.Option(help="Seed for data, models and training.")] = 0,
    overwrite: Annotated[bool, typer.Option(help="Replace OUTPUT if it exists.")] = True,
) -> None:
    """Run the embedded default: a small CAT composition on a CPU, no download.

    Builds a tiny model and tokenizer, trains two skill LoRAs, composes them by CAT, exports a PEFT
    adapter and checks that stock PEFT reproduces the CAT logits. About a minute on a laptop CPU.
    """
    from lorasoup.demo import run_demo

    with step_progress("demo") as progress:
        summary = run_demo(output, seed=seed, overwrite=overwrite, progress=progress)
    table = Table(title="lorasoup demo: CAT on two skill LoRAs (tiny model, CPU)")
    for column in ("model", "loss on skill A", "loss on skill B", "loss on mix"):
        table.add_column(column)
    for row in summary.rows:
        table.add_row(row.name, *(f"{v:.3f}" for v in (row.loss_a, row.loss_b, row.loss_mix)))
    console.print(table)
    console.print(
        f"exported adapter reproduces CAT logits: max |diff| = {summary.export_max_abs_diff:.2e} "
        f"(stock peft.PeftModel) -> {summary.cat_output}"
    )


def main() -> None:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    # Our own progress bars and tables say what is happening; the libraries' per-file bars and
    # deprecation notices would bury them.
    warnings.filterwarnings("ignore", category=FutureWarning)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    app()


if __name__ == "__main__":
    main()
