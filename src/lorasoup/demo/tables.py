"""The demo's optional tables: how each method scales with K, and format robustness.

:func:`extra_results` turns what :func:`~lorasoup.demo.study.run_seed` left in each seed's facts
(``"k3"``: the three-skill rows, ``"formats"``: the format rows) into ``results.json`` entries;
:func:`extra_sections` writes their report sections and plots. Both give nothing for a default run.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from lorasoup.demo.robustness import STATS, format_table
from lorasoup.demo.settings import TASKS_K3, aggregate

K_COLUMNS = ("K=2", "K=3")


def extra_results(
    table: Sequence[dict[str, Any]], facts: Sequence[dict[str, Any]], settings: Any
) -> dict[str, Any]:
    """The ``results.json`` entries of the parts that ran (their rows are taken out of ``facts``):

    - ``k3``: ``tasks``, ``table`` (mean ± std over seeds) and ``per_seed`` of the three-skill study;
      ``scaling``: each method's composite accuracy at K = 2 (from ``table``, the main two-skill
      table) and at K = 3 (:func:`scaling_table`);
    - ``formats``: ``frames``, ``train_formats``, ``held_out``, ``table`` (per frame, and the held-out
      mean / worst / best / spread) and ``per_seed``.
    """
    results: dict[str, Any] = {}
    if facts and "k3" in facts[0]:
        per_seed = [f.pop("k3") for f in facts]
        k3 = aggregate(per_seed, TASKS_K3)
        results["k3"] = {
            "tasks": list(TASKS_K3),
            "table": k3,
            "per_seed": [[vars(row) for row in rows] for rows in per_seed],
        }
        results["scaling"] = scaling_table(table, k3)
    if facts and "formats" in facts[0]:
        per_seed = [f.pop("formats") for f in facts]
        frames = ["plain", *settings.held_out_formats]
        results["formats"] = {
            "frames": frames,
            "train_formats": list(settings.train_formats),
            "held_out": list(settings.held_out_formats),
            "table": format_table(per_seed, frames, settings.held_out_formats),
            "per_seed": [[vars(row) for row in rows] for rows in per_seed],
        }
    return results


def scaling_table(k2: Sequence[dict[str, Any]], k3: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per method of either table: its composite accuracy at K = 2 and at K = 3 (or None)."""
    two = {row["method"]: row["composite"] for row in k2}
    three = {row["method"]: row["composite3"] for row in k3}
    kinds = {row["method"]: row["kind"] for row in [*k2, *k3]}
    order = list(dict.fromkeys([*(row["method"] for row in k3), *two]))
    return [{"method": m, "kind": kinds[m], "K=2": two.get(m), "K=3": three.get(m)} for m in order]


def _pct(value: dict[str, Any] | None, seeds: int) -> str:
    if value is None:
        return "–"
    mean = f"{100 * value['mean']:.1f}"
    return f"{mean} ± {100 * value['std']:.1f}" if seeds > 1 else mean


def extra_sections(folder: Path, results: dict[str, Any], seeds: int) -> tuple[list[str], dict[str, Path]]:
    """Markdown lines and the images they embed, for the K = 3 and the format-robustness parts."""
    lines: list[str] = []
    images: dict[str, Path] = {}
    if "k3" in results:
        lines += _k3_section(folder, results, seeds, images)
    if "formats" in results:
        lines += _format_section(folder, results["formats"], seeds, images)
    return lines, images


def _k3_section(folder: Path, results: dict[str, Any], seeds: int, images: dict[str, Path]) -> list[str]:
    import json

    from lorasoup.report import markdown_table, methods_bar_chart, weights_heatmap

    k3 = results["k3"]["table"]
    headers = ["method", "3-way composite (%)", "math (%)", "code (%)", "extra (%)"]
    rows = [[row["method"], *(_pct(row[t], seeds) for t in TASKS_K3)] for row in k3]
    scaling = results["scaling"]
    change = [
        "–" if r["K=2"] is None else f"{100 * (r['K=3']['mean'] - r['K=2']['mean']):+.1f}" for r in scaling
    ]
    scale_rows = [
        [r["method"], _pct(r["K=2"], seeds), _pct(r["K=3"], seeds), c]
        for r, c in zip(scaling, change, strict=True)
    ]
    both = [r for r in scaling if r["K=2"] is not None and r["K=3"] is not None]
    images["scaling.png"] = methods_bar_chart(
        both, K_COLUMNS, folder / "scaling.png", title="composite accuracy at K = 2 and K = 3"
    )
    cat = next(r for r in results["k3"]["per_seed"][0] if r["method"] == "CAT (trained)")
    weights = json.loads((Path(cat["artifact"]) / "cat_weights.json").read_text(encoding="utf-8"))
    images["cat_weights_k3.png"] = weights_heatmap(
        weights["weights"], folder / "cat_weights_k3.png", title="CAT's learned weights, K = 3 (first seed)"
    )
    return [
        "## Three skills (K = 3)",
        "",
        "A third skill LoRA, *extra* (a clause `then tom finds 5 more` → `a + b + 5`, learnt on "
        "addition/subtraction stories in the math format), joins math and code. The 3-way composite: "
        "a multiplication story with the clause, answered by a PAL program returning `a * b + c`; "
        "every method composes the three LoRAs, and the oracle is trained on 3-way composite data.",
        "",
        markdown_table(headers, rows),
        "### How each method scales with K",
        "",
        "Composite accuracy (%) on the K-skill composite, same run, same base model: K = 2 composes "
        "math + code (the table above), K = 3 composes math + code + extra.",
        "",
        markdown_table(["method", "K = 2", "K = 3", "change (points)"], scale_rows),
        "![composite accuracy at K = 2 and K = 3](scaling.png)",
        "",
        "![CAT weights, K = 3](cat_weights_k3.png)",
        "",
    ]


def _format_section(folder: Path, formats: dict[str, Any], seeds: int, images: dict[str, Path]) -> list[str]:
    from lorasoup.report import markdown_table, methods_bar_chart

    frames, held_out, table = formats["frames"], formats["held_out"], formats["table"]
    headers = ["method", *(f"{f} (%)" for f in frames), *(f"held-out {s} (%)" for s in STATS), "how"]
    rows = [
        [
            row["method"],
            *(_pct(row[f], seeds) for f in frames),
            *(_pct(row["held_out"][s], seeds) for s in STATS),
            row["detail"],
        ]
        for row in table
    ]
    images["formats.png"] = methods_bar_chart(
        table, frames, folder / "formats.png", title="composite accuracy per prompt frame"
    )
    return [
        "## Prompt-format robustness",
        "",
        "The 2-skill composite test set in the frame every LoRA and plain CAT was trained in (`plain`) "
        f"and in frames held out from all training but the base's ({', '.join(held_out)}). "
        f"Format-robust CAT trains the CAT weights in {', '.join(formats['train_formats'])}; the skill "
        "LoRAs themselves saw `plain` only. Spread = best − worst held-out frame.",
        "",
        markdown_table(headers, rows),
        "![composite accuracy per prompt frame](formats.png)",
        "",
    ]
