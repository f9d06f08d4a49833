"""Per-example results, the summary computed from them, and its Markdown table.

A run's numbers are always recomputed from the per-example records, so a resumed run (part of its
records read back from ``examples.jsonl``) gives the same summary as an uninterrupted one.

Summary (``summary.json``): ``examples``, ``correct``, ``accuracy`` (share of correct examples),
``accuracy_rule`` (what "correct" means, e.g. ``tfidf_cosine > 0.3``), ``headline`` (the score reports
lead with: ``accuracy`` or a metric), ``metrics`` (mean of each metric), ``verdicts`` (count of each),
``subsets`` (the same per data file), and, when there are several subsets, ``across_subsets``: the
mean, worst, best and spread (best - worst) of the subsets' accuracies (the prompt-format robustness
numbers). Tasks with a question add ``echo_baseline``: the same blocks for the question itself used as
the answer (no model), overall and per subset.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from lorasoup.errors import DataError

if TYPE_CHECKING:
    from lorasoup.evaluation.tasks.spec import TaskSpec

ECHO_LABEL = "question echo (no model)"


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
    echo: dict[str, Any] = field(default_factory=dict)  # the question as answer: {"correct", "scores"}

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, row: Mapping[str, Any], where: str) -> ExampleResult:
        names = {f.name for f in dataclasses.fields(cls)}
        missing = {"id", "subset", "index", "verdict", "correct"} - set(row)
        if missing or set(row) - names:
            raise DataError(f"{where}: not a lorasoup example record (fields {sorted(row)})")
        return cls(**row)


def summarise(results: Sequence[ExampleResult], spec: TaskSpec) -> dict[str, Any]:
    """The summary of a run (see the module doc); subsets keep their order of first appearance."""
    metric_names = spec.metric_names
    summary = _block(results, metric_names)
    summary["accuracy_rule"] = f"{spec.metric} > {spec.threshold:g}"
    summary["headline"] = spec.headline
    summary["verdicts"] = dict(Counter(r.verdict for r in results).most_common())
    subsets = _by_subset(results)
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
    if results and all(r.echo for r in results):
        echoes = [_echo_as_result(r) for r in results]
        summary["echo_baseline"] = _block(echoes, metric_names)
        summary["echo_baseline"]["subsets"] = {
            name: _block(rows, metric_names) for name, rows in _by_subset(echoes).items()
        }
    return summary


def _by_subset(results: Sequence[ExampleResult]) -> dict[str, list[ExampleResult]]:
    subsets: dict[str, list[ExampleResult]] = {}
    for result in results:
        subsets.setdefault(result.subset, []).append(result)
    return subsets


def _echo_as_result(result: ExampleResult) -> ExampleResult:
    return dataclasses.replace(
        result, correct=bool(result.echo["correct"]), scores=dict(result.echo["scores"]), echo={}
    )


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


def score_columns(summary: Mapping[str, Any]) -> list[tuple[str, str]]:
    """``(label, key)`` of the score columns in report order: the headline first, then accuracy (labelled
    with its rule), then the other metrics. ``key`` is ``accuracy`` or a metric name."""
    accuracy = f"accuracy ({summary['accuracy_rule']})" if summary.get("accuracy_rule") else "accuracy"
    keys = ["accuracy", *summary["metrics"]]
    headline = summary.get("headline", "accuracy")
    ordered = [headline, *(k for k in keys if k != headline)]
    return [(accuracy if key == "accuracy" else key, key) for key in ordered]


def score_cells(block: Mapping[str, Any], columns: Sequence[tuple[str, str]]) -> list[str]:
    """A block's values for ``score_columns``, four decimals."""
    return [f"{block['accuracy'] if key == 'accuracy' else block['metrics'][key]:.4f}" for _, key in columns]


def markdown_report(
    task: str, summary: Mapping[str, Any], *, model: str, adapter: str | None, throughput: Mapping[str, Any]
) -> str:
    """``summary.md``: the headline table (with the question-echo baseline where the task has one),
    subsets with their spread, verdicts and throughput."""
    columns = score_columns(summary)
    labels = [f"**{label}**" if i == 0 else label for i, (label, _) in enumerate(columns)]
    echo = summary.get("echo_baseline")
    lines = [
        f"# lorasoup eval: {task}",
        "",
        "| model | adapter | examples | " + " | ".join(labels) + " |",
        "|---|---|---|" + "---|" * len(columns),
        f"| {model} | {adapter or '-'} | {summary['examples']} | "
        + " | ".join(score_cells(summary, columns))
        + " |",
    ]
    if echo is not None:
        cells = score_cells(echo, columns)
        lines.append(f"| {ECHO_LABEL} | - | {echo['examples']} | " + " | ".join(cells) + " |")
    if len(summary["subsets"]) > 1:
        lines += ["", "| subset | examples | " + " | ".join(labels) + " |"]
        lines.append("|---|---|" + "---|" * len(columns))
        for name, block in summary["subsets"].items():
            cells = score_cells(block, columns)
            lines.append(f"| {name} | {block['examples']} | " + " | ".join(cells) + " |")
            if echo is not None:
                cells = score_cells(echo["subsets"][name], columns)
                lines.append(f"| {name}: {ECHO_LABEL} | {block['examples']} | " + " | ".join(cells) + " |")
        across = summary["across_subsets"]
        lines += [
            "",
            f"Across subsets (accuracy): mean {across['mean']:.4f}, "
            f"worst {across['worst']:.4f} ({across['worst_subset']}), "
            f"best {across['best']:.4f} ({across['best_subset']}), spread {across['spread']:.4f}.",
        ]
    if echo is not None:
        lines += [
            "",
            f"The {ECHO_LABEL} row scores each question itself as the answer: a score the echo reaches "
            "rewards repeating the question (docs/evaluation.md).",
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
