"""The results tables of the runs given: the demo's methods table and bar chart, then one table per
kind of run (CAT, merges and recompressions, evaluations, training), from each run's own files."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from lorasoup.report.page import RESULTS, Page, pct
from lorasoup.report.plots import methods_bar_chart
from lorasoup.report.runs import Run


def results_section(page: Page, runs: Sequence[Run]) -> None:
    """The results tables of the runs given, one table per kind of run."""
    page.add(f"## {RESULTS}")
    for demo in [r for r in runs if r.kind == "demo"]:
        _demo_results(page, demo)
    every = [c for r in runs for c in (r, *r.children)]
    tables = (
        (
            "CAT runs",
            "cat",
            _cat_row,
            ["run", "skills", "weights", "steps", "loss first → last", "max |Δw|", "rank"],
        ),
        (
            "Merges and recompressions",
            ("merge", "compress"),
            _merge_row,
            ["run", "method", "adapters", "rank", "discarded energy mean (%)", "max (%)"],
        ),
        (
            "Evaluations",
            "eval",
            _eval_row,
            ["run", "task", "model", "adapter", "examples", "accuracy (%)", "metrics", "across subsets"],
        ),
        (
            "Training runs",
            "train",
            _train_row,
            ["run", "base model", "data", "r", "steps", "loss first → last", "eval loss"],
        ),
    )
    for title, kinds, make_row, headers in tables:
        chosen = [r for r in every if r.kind in (kinds if isinstance(kinds, tuple) else (kinds,))]
        if chosen:
            page.add(f"### {title}")
            page.table(headers, [make_row(r) for r in chosen])


def _demo_results(page: Page, demo: Run) -> None:
    results = demo.json("results.json")
    tasks, seeds, table = results["tasks"], results["seeds"], results["table"]
    page.add(
        f"### Demo: {demo.label}",
        f"Seeds {', '.join(map(str, seeds))}; accuracy in %, mean ± std over seeds.",
    )

    def cell(value: Mapping[str, float]) -> str:
        return f"{100 * value['mean']:.1f}" + (f" ± {100 * value['std']:.1f}" if len(seeds) > 1 else "")

    page.table(
        ["method", "kind", *tasks, "how"],
        [
            [row["method"], row.get("kind", ""), *(cell(row[t]) for t in tasks), row.get("detail", "")]
            for row in table
        ],
    )
    page.image(
        f"demo-{demo.label}-methods",
        "accuracy per method",
        lambda path: methods_bar_chart(table, tasks, path, title=f"{demo.label}: accuracy per method"),
    )


def _loss(training: Mapping[str, Any]) -> str:
    first, last = training.get("first_loss"), training.get("last_loss")
    return "-" if first is None or last is None else f"{first:.4f} → {last:.4f}"


def _cat_row(run: Run) -> list[Any]:
    weights = run.json("cat_weights.json")
    moved = (run.record.get("weight_movement") or {}).get("weight_max_abs_change")
    training = run.record.get("training") or {}
    return [
        run.label,
        ", ".join(weights.get("adapters", [])),
        f"{weights.get('parameterisation')} per {weights.get('granularity')}",
        training.get("steps", "-"),
        _loss(training),
        "-" if moved is None else f"{moved:.3f}",
        (run.record.get("export") or {}).get("rank", "-"),
    ]


def _merge_row(run: Run) -> list[Any]:
    report = run.json("merge_report.json")
    method = run.record.get("method")
    name = method.get("name") if isinstance(method, dict) else run.kind
    weights = [a.get("weight") for a in run.config.get("adapters") or [] if isinstance(a, dict)]
    names = list(run.record.get("adapters") or {})
    if len(weights) == len(names):
        names = [f"{n} ×{w}" if w is not None else n for n, w in zip(names, weights, strict=True)]
    adapters = ", ".join(names)
    return [
        run.label,
        name,
        adapters,
        report.get("rank", "-"),
        pct(report.get("mean_discarded_energy")),
        pct(report.get("max_discarded_energy")),
    ]


def _eval_row(run: Run) -> list[Any]:
    summary = run.json("summary.json")
    metrics = ", ".join(f"{k} {v:.3f}" for k, v in (summary.get("metrics") or {}).items())
    across = summary.get("across_subsets")
    spread = (
        f"mean {pct(across['mean'])}, worst {pct(across['worst'])}, spread {pct(across['spread'])}"
        if across
        else "-"
    )
    return [
        run.label,
        summary.get("task", run.config.get("task", "-")),
        f"`{run.config.get('model', '-')}`",
        f"`{run.config.get('adapter')}`" if run.config.get("adapter") else "-",
        summary.get("examples", "-"),
        pct(summary.get("accuracy")),
        metrics or "-",
        spread,
    ]


def _train_row(run: Run) -> list[Any]:
    base = run.record.get("base_model") or {}
    data = run.record.get("data") or {}
    training = run.record.get("training") or {}
    eval_loss = training.get("eval_loss")
    return [
        run.label,
        f"{base.get('architecture', '-')} ({base.get('num_parameters', 0):,} params)",
        ", ".join(data.get("sources") or []) or "-",
        (run.config.get("lora") or {}).get("r", "-"),
        training.get("steps", "-"),
        _loss(training),
        "-" if eval_loss is None else f"{eval_loss:.4f}",
    ]
