"""Per-example results, the summary computed from them, and its Markdown table.

A run's numbers are always recomputed from the per-example records, so a resumed run (part of its
records read back from ``examples.jsonl``) gives the same summary as an uninterrupted one.

Summary (``summary.json``): ``examples``, ``correct``, ``accuracy`` (share of correct examples),
``metrics`` (mean of each metric), ``verdicts`` (count of each), ``subsets`` (the same per data file),
and, when there are several subsets, ``across_subsets``: the mean, worst, best and spread
(best - worst) of the subsets' accuracies (the prompt-format robustness numbers).
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from lorasoup.errors import DataError


@dataclass
class ExampleResult:
    """One line of ``examples.jsonl``."""

    id: str
    subset: str
    index: int
    prompt: str
    generation: str
    extracted: str | None
    reference: Any
    verdict: str
    correct: bool
    scores: dict[str, float] = field(default_factory=dict)
    detail: str = ""
    prompt_tokens: int = 0
    new_tokens: int = 0
    finish_reason: str = ""
    notes: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, row: Mapping[str, Any], where: str) -> ExampleResult:
        names = {f.name for f in dataclasses.fields(cls)}
        missing = {"id", "subset", "index", "verdict", "correct"} - set(row)
        if missing or set(row) - names:
            raise DataError(f"{where}: not a lorasoup example record (fields {sorted(row)})")
        return cls(**row)


def summarise(results: Sequence[ExampleResult], metric_names: Sequence[str]) -> dict[str, Any]:
    """The summary of a run (see the module doc); subsets keep their order of first appearance."""
    summary = _block(results, metric_names)
    summary["verdicts"] = dict(Counter(r.verdict for r in results).most_common())
    subsets: dict[str, list[ExampleResult]] = {}
    for result in results:
        subsets.setdefault(result.subset, []).append(result)
    summary["subsets"] = {name: _block(rows, metric_names) for name, rows in subsets.items()}
    if len(subsets) > 1:
        accuracies = {name: block["accuracy"] for name, block in summary["subsets"].items()}
        worst = min(accuracies, key=accuracies.__getitem__)
        best = max(accuracies, key=accuracies.__getitem__)
        summary["across_subsets"] = {
            "mean": sum(accuracies.values()) / len(accuracies),
            "worst": accuracies[worst],
            "worst_subset": worst,
            "best": accuracies[best],
            "best_subset": best,
            "spread": accuracies[best] - accuracies[worst],
        }
    return summary


def _block(results: Sequence[ExampleResult], metric_names: Sequence[str]) -> dict[str, Any]:
    count = len(results)
    correct = sum(1 for r in results if r.correct)
    means = {
        name: (sum(r.scores.get(name, 0.0) for r in results) / count if count else 0.0)
        for name in metric_names
    }
    return {
        "examples": count,
        "correct": correct,
        "accuracy": correct / count if count else 0.0,
        "metrics": means,
    }


def markdown_report(
    task: str, summary: Mapping[str, Any], *, model: str, adapter: str | None, throughput: Mapping[str, Any]
) -> str:
    """``summary.md``: the headline table, subsets with their spread, verdicts and throughput."""
    metrics = list(summary["metrics"])
    lines = [
        f"# lorasoup eval: {task}",
        "",
        "| model | adapter | examples | accuracy | " + " | ".join(metrics) + " |",
        "|---|---|---|---|" + "---|" * len(metrics),
        f"| {model} | {adapter or '-'} | {summary['examples']} | {summary['accuracy']:.4f} | "
        + " | ".join(f"{summary['metrics'][m]:.4f}" for m in metrics)
        + " |",
    ]
    if len(summary["subsets"]) > 1:
        lines += ["", "| subset | examples | accuracy | " + " | ".join(metrics) + " |"]
        lines.append("|---|---|---|" + "---|" * len(metrics))
        for name, block in summary["subsets"].items():
            values = " | ".join(f"{block['metrics'][m]:.4f}" for m in metrics)
            lines.append(f"| {name} | {block['examples']} | {block['accuracy']:.4f} | {values} |")
        across = summary["across_subsets"]
        lines += [
            "",
            f"Across subsets: mean {across['mean']:.4f}, "
            f"worst {across['worst']:.4f} ({across['worst_subset']}), "
            f"best {across['best']:.4f} ({across['best_subset']}), spread {across['spread']:.4f}.",
        ]
    lines += ["", "| verdict | count |", "|---|---|"]
    lines += [f"| {verdict} | {count} |" for verdict, count in summary["verdicts"].items()]
    if throughput.get("examples"):
        lines += [
            "",
            f"Throughput (this session, {throughput['examples']} examples): "
            f"{throughput['examples_per_s']:.2f} examples/s, {throughput['tokens_per_s']:.1f} new tokens/s.",
        ]
    return "\n".join(lines) + "\n"
