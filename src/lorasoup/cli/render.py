"""What the CLI prints after the one library call: result tables and the closing "wrote" line.

Each printer takes the console it writes to and a library result, and prints; none computes
anything a library result does not already hold. Tables of learned weights (CAT, search, distilled
MoE) are one table, :func:`weights_table`.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

from rich.console import Console
from rich.table import Table

if TYPE_CHECKING:
    from torch import Tensor

    from lorasoup.adapters import LoraAdapter
    from lorasoup.cat.run import CatRunResult
    from lorasoup.demo.run import DemoSummary
    from lorasoup.demo.scale import StudySummary
    from lorasoup.evaluation.runner import EvalResult
    from lorasoup.merging.base import MergeMethod
    from lorasoup.merging.run import MergeResult
    from lorasoup.moe.run import DistillResult, MoeRunResult
    from lorasoup.registry import Registry
    from lorasoup.report.build import ReportResult
    from lorasoup.search.layer_swap_run import LayerSwapRunResult
    from lorasoup.search.run import SearchRunResult
    from lorasoup.training.skill import TrainResult


def print_notices(console: Console, notices: Iterable[str]) -> None:
    for notice in notices:
        console.print(f"[yellow]notice:[/] {notice}", highlight=False)


def weights_table(title: str, adapter_names: Sequence[str], weights: Tensor) -> Table:
    """Mean, min and max over groups (modules, layers) of each adapter's weight; ``weights`` is (G, K)."""
    table = Table(title=title)
    for name in ("adapter", "mean", "min", "max"):
        table.add_column(name)
    for k, name in enumerate(adapter_names):
        column = weights[:, k]
        table.add_row(name, f"{column.mean():.3f}", f"{column.min():.3f}", f"{column.max():.3f}")
    return table


def adapters_table(loaded: Sequence[LoraAdapter]) -> Table:
    """``lorasoup inspect``: one row per adapter."""
    table = Table(title="Adapters", show_lines=False)
    columns = ("name", "base model", "ranks", "alpha", "scaling", "targets", "modules", "dtype", "params")
    for column in columns:
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
    return table


def print_cat_result(console: Console, result: CatRunResult) -> None:
    fit = result.fit
    print_notices(console, result.notices)
    if fit.first_loss is not None:
        console.print(
            f"loss {fit.first_loss:.4f} -> {fit.last_loss:.4f} over {fit.steps} steps ({fit.seconds:.1f} s)"
        )
    composition = result.composition
    weights = composition.effective_weights()
    console.print(weights_table("CAT weights (mean over groups)", composition.adapter_names, weights))
    console.print(f"[bold green]wrote[/] {result.output} (PEFT adapter, rank {result.export_rank})")


def print_search_result(console: Console, result: SearchRunResult) -> None:
    found = result.search
    print_notices(console, result.notices)
    console.print(
        f"objective {found.start_objective:.4f} -> {found.objective:.4f} (loss {found.loss:.4f}) after "
        f"{found.trace.evaluations} candidates, {found.candidates_per_second:.1f}/s; "
        f"stopped: {found.trace.stop_reason}",
        highlight=False,
    )
    names = result.composition.adapter_names
    console.print(weights_table("searched weights (over groups)", names, found.weights))
    console.print(f"[bold green]wrote[/] {result.output} (PEFT adapter, rank {result.export_rank})")


def print_layer_swap_search_result(console: Console, result: LayerSwapRunResult, top: int = 5) -> None:
    """The best ``top`` layer-swap rules by loss, then the chosen one."""
    found = result.search
    print_notices(console, result.notices)
    total = len(found.candidates)
    table = Table(title=f"layer-swap rules: best {min(top, total)} of {total}")
    table.add_column("loss", justify="right")
    table.add_column("family")
    table.add_column(f"layers (of {found.num_layers})")
    rows = found.table()
    for index in found.ranking()[:top]:
        loss = rows[index]["loss"]
        table.add_row("-" if loss is None else f"{loss:.4f}", rows[index]["family"], rows[index]["layers"])
    console.print(table)
    console.print(
        f"chosen: {rows[found.best]['layers']} (loss {found.loss:.4f}; {len(found.candidates)} rules in "
        f"{found.seconds:.1f} s)",
        highlight=False,
    )
    console.print(f"[bold green]wrote[/] {result.output} (PEFT adapter, rank {result.export_rank})")


def print_moe_result(console: Console, result: MoeRunResult) -> None:
    fit = result.trained.fit
    print_notices(console, result.notices)
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


def print_distill_result(console: Console, result: DistillResult) -> None:
    composition = result.composition
    title = f"distilled CAT weights (mean over {len(result.weights)} modules)"
    console.print(weights_table(title, composition.adapter_names, composition.effective_weights()))
    console.print(
        f"[bold green]wrote[/] {result.output} (PEFT adapter, rank {result.rank}; gates averaged over "
        f"{result.tokens} tokens)"
    )


def merge_methods_table(methods: Registry[MergeMethod]) -> Table:
    """``lorasoup merge --list``: the registry's entries."""
    table = Table(title="merge methods")
    table.add_column("name", no_wrap=True)
    table.add_column("space")
    table.add_column("what it does")
    table.add_column("reference", overflow="fold")  # a narrow terminal folds a URL, never cuts it
    for name in methods:
        entry = methods.get(name)
        table.add_row(name, entry.space, entry.summary, entry.reference)
    return table


def print_merge_result(console: Console, result: MergeResult) -> None:
    """``lorasoup merge`` and ``lorasoup compress``."""
    print_notices(console, result.notices)
    lost = result.max_discarded_energy
    detail = "exact" if lost is None else f"largest discarded energy {lost:.2%} of a module's ‖ΔW‖²"
    console.print(
        f"[bold green]wrote[/] {result.output} (PEFT adapter, rank {result.rank}, {len(result.modules)} "
        f"modules, {detail}, {result.seconds:.1f} s)"
    )


def print_train_result(console: Console, result: TrainResult) -> None:
    print_notices(console, result.notices)

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


def eval_table(task: str, summary: dict[str, Any]) -> Table:
    """The task's scores, its headline first (``score_columns``), and the question-echo baseline under
    each row where the task has one (an echo of the question must not look like a score)."""
    from lorasoup.evaluation.results import ECHO_LABEL, score_cells, score_columns

    echo = summary.get("echo_baseline")
    columns = score_columns(summary)
    table = Table(title=f"lorasoup eval: {task}")
    for column in ("subset", "examples", *(label for label, _ in columns)):
        table.add_column(column)
    blocks = [*summary["subsets"].items()] if len(summary["subsets"]) > 1 else []
    for name, block in [*blocks, ("[bold]all[/]", summary)]:
        table.add_row(name, str(block["examples"]), *score_cells(block, columns))
        if echo is not None:
            own = echo if block is summary else echo["subsets"][name]
            table.add_row(f"  {ECHO_LABEL}", str(own["examples"]), *score_cells(own, columns), style="dim")
    return table


def print_eval_result(console: Console, task: str, result: EvalResult) -> None:
    summary = result.summary
    console.print(eval_table(task, summary))
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


def print_report_result(console: Console, result: ReportResult) -> None:
    console.print(f"sections: {', '.join(result.sections)}", highlight=False)
    console.print(f"[bold green]wrote[/] {result.output}/report.md and report.html ({result.seconds:.1f} s)")


def accuracy_cell(value: dict[str, float] | None, several: bool) -> str:
    """``12.5`` for one seed, ``12.5 ± 1.2`` for several, ``–`` where nothing finished."""
    if value is None:
        return "–"
    return f"{100 * value['mean']:.1f}" + (f" ± {100 * value['std']:.1f}" if several else "")


DEMO_COLUMNS = {
    "composite": "composite task",
    "math": "math skill",
    "code": "code skill",
    "gsm-hard": "GSM-Hard",
}
"""The demo's tasks as the terminal table names them (GSM-Hard: the real-model study with its data)."""

DEMO_K3_COLUMNS = {
    "composite3": "3-way composite",
    "math": "math skill",
    "code": "code skill",
    "extra": "extra skill",
}
"""The three-skill study's tasks (``--set skills=3``)."""


def demo_table(title: str, rows: list[dict[str, Any]], names: dict[str, str], several: bool) -> Table:
    """One of the demo's tables: ``rows`` in the columns of ``names`` that they have."""
    table = Table(title=title)
    tasks = [task for task in names if task in rows[0]]
    table.add_column("method", no_wrap=True)
    for task in tasks:
        table.add_column(names[task], justify="right")
    for row in rows:
        cells = [accuracy_cell(row[task], several) for task in tasks]
        style = "bold" if row["method"] == "CAT (trained)" else None
        table.add_row(row["method"], *cells, style=style)
    return table


def print_demo_result(console: Console, summary: DemoSummary) -> None:
    seeds, several = f"accuracy % (seeds {summary.seeds})", len(summary.seeds) > 1
    title = f"lorasoup demo: composite task and skill retention, {seeds}"
    console.print(demo_table(title, summary.table, DEMO_COLUMNS, several))
    if summary.k3_table:
        title = f"three skills (K = 3): 3-way composite and each skill, {seeds}"
        console.print(demo_table(title, summary.k3_table, DEMO_K3_COLUMNS, several))
    console.print(
        f"[bold green]wrote[/] {summary.output}/report.md, report.html and results.json "
        f"({summary.seconds:.0f} s)"
    )


def print_saved_benchmark(console: Console, saved: dict[str, Any]) -> None:
    counts = ", ".join(f"seed {s}: {n:,}" for s, n in saved["records"].items())
    console.print(
        f"[bold green]wrote[/] {saved['path']} ({counts} records, {saved['seconds']:.0f} s); "
        f"run with --set benchmark_file={saved['path']}"
    )


def print_study_result(console: Console, summary: StudySummary) -> None:
    from lorasoup.demo.scale_report import human_count

    data = summary.scaling
    several = max(len(size["seeds"]) for size in data["sizes"]) > 1
    names = [size["name"] for size in data["sizes"]]
    table = Table(title="lorasoup study: composite task accuracy % per base model size")
    table.add_column("method")
    for size in data["sizes"]:
        table.add_column(f"{size['name']} ({human_count(size['parameters'])})", justify="right")
    for method in data["methods"]:
        cells = [accuracy_cell(value, several) for value in data["accuracy"][method]["composite"]]
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
