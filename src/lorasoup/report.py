"""Reports: results tables, plots (matplotlib PNGs) and static Markdown/HTML pages.

Plots are drawn with matplotlib's non-interactive Agg backend, so they work on a headless machine.
The HTML page embeds its images (base64), so it is one file that opens anywhere, offline.
"""

from __future__ import annotations

import base64
import html
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

_LAYER = re.compile(r"(?:^|\.)(?:layers|h|blocks|layer)\.(\d+)\.")


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def methods_bar_chart(
    rows: Sequence[Mapping[str, Any]], tasks: Sequence[str], path: Path, *, title: str
) -> Path:
    """Grouped bars: one group per method, one bar per task (mean, with the std as an error bar).

    ``rows``: ``{"method": str, task: {"mean": float, "std": float}, ...}``.
    """
    plt = _pyplot()
    width = 0.8 / len(tasks)
    fig, ax = plt.subplots(figsize=(max(6.0, 0.9 * len(rows) + 2), 4.2))
    for t, task in enumerate(tasks):
        xs = [i + (t - (len(tasks) - 1) / 2) * width for i in range(len(rows))]
        means = [100 * row[task]["mean"] for row in rows]
        errors = [100 * row[task]["std"] for row in rows]
        ax.bar(xs, means, width, yerr=errors, capsize=2, label=task)
    ax.set_xticks(range(len(rows)))
    ax.set_xticklabels([row["method"] for row in rows], rotation=35, ha="right", fontsize=8)
    ax.set_ylabel("accuracy (%)")
    ax.set_ylim(0, 105)
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def weights_grid(
    weights: Mapping[str, Mapping[str, float]],
) -> tuple[list[int], list[str], dict[str, list[list[float]]]]:
    """``cat_weights.json`` weights (group → adapter → w) as a layer × module grid per adapter.

    Groups are module paths (``model.layers.3.mlp.up_proj``), layers (``layer.3``) or ``global``;
    cells with no group are NaN.
    """
    cells: dict[tuple[int, str], Mapping[str, float]] = {}
    for group, per_adapter in weights.items():
        match = _LAYER.search(group) or re.match(r"layer\.(\d+)$", group)
        layer = int(match.group(1)) if match else 0
        module = group.rsplit(".", 1)[-1] if match and not group.startswith("layer.") else group.split(".")[0]
        cells[(layer, module)] = per_adapter
    layers = sorted({layer for layer, _ in cells})
    modules = sorted({module for _, module in cells})
    adapters = list(next(iter(weights.values())))
    grids = {
        adapter: [
            [float(cells[(layer, m)][adapter]) if (layer, m) in cells else float("nan") for m in modules]
            for layer in layers
        ]
        for adapter in adapters
    }
    return layers, modules, grids


def weights_heatmap(weights: Mapping[str, Mapping[str, float]], path: Path, *, title: str) -> Path:
    """One heatmap per adapter of CAT's learned weights: layers down, modules across."""
    plt = _pyplot()
    layers, modules, grids = weights_grid(weights)
    values = [v for grid in grids.values() for row in grid for v in row if v == v]
    low, high = min(values), max(values)
    fig, axes = plt.subplots(
        1,
        len(grids),
        figsize=(1.2 + 0.55 * len(modules) * len(grids), 0.9 + 0.35 * len(layers)),
        squeeze=False,
    )
    image = None
    for ax, (adapter, grid) in zip(axes[0], grids.items(), strict=True):
        image = ax.imshow(grid, cmap="viridis", vmin=low, vmax=high, aspect="auto")
        ax.set_title(adapter, fontsize=9)
        ax.set_xticks(range(len(modules)))
        ax.set_xticklabels(modules, rotation=60, ha="right", fontsize=7)
        ax.set_yticks(range(len(layers)))
        ax.set_yticklabels([f"layer {layer}" for layer in layers], fontsize=7)
    fig.colorbar(image, ax=axes[0].tolist(), shrink=0.8, label="weight")
    fig.suptitle(title, fontsize=10)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return path


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def markdown_to_html(markdown: str, *, title: str, images: Mapping[str, Path]) -> str:
    """A small, dependency-free rendering of the report's Markdown (headings, tables, lists, images,
    paragraphs); ``images`` maps each image file name used in the Markdown to its path, embedded."""
    body: list[str] = []
    table: list[list[str]] = []

    def flush_table() -> None:
        if table:
            head, *rest = table
            cells = "".join(f"<th>{c}</th>" for c in head)
            rows = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in rest)
            body.append(f"<table><thead><tr>{cells}</tr></thead><tbody>{rows}</tbody></table>")
            table.clear()

    for line in markdown.splitlines():
        if line.startswith("|"):
            cells = [_inline(c.strip()) for c in line.strip().strip("|").split("|")]
            if not all(set(c) <= {"-", ":"} for c in cells):
                table.append(cells)
            continue
        flush_table()
        image = re.fullmatch(r"!\[(.*?)\]\((.*?)\)", line.strip())
        if image:
            body.append(_embedded(image.group(1), images.get(image.group(2))))
        elif line.startswith("#"):
            level = len(line) - len(line.lstrip("#"))
            body.append(f"<h{level}>{_inline(line[level:].strip())}</h{level}>")
        elif line.startswith("- "):
            body.append(f"<ul><li>{_inline(line[2:])}</li></ul>")
        elif line.strip():
            body.append(f"<p>{_inline(line)}</p>")
    flush_table()
    style = (
        "body{font-family:system-ui,sans-serif;max-width:60rem;margin:2rem auto;padding:0 1rem;"
        "line-height:1.45}table{border-collapse:collapse;margin:1rem 0}"
        "td,th{border:1px solid #ccc;padding:.3rem .6rem;text-align:left}"
        "th{background:#f3f3f3}img{max-width:100%}code{background:#f3f3f3;padding:0 .2rem}ul{margin:.2rem 0}"
    )
    return (
        f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
        f"<style>{style}</style></head><body>{''.join(body)}</body></html>\n"
    )


def _inline(text: str) -> str:
    escaped = html.escape(text)
    escaped = re.sub(r"`([^`]+)`", r"<code>\1</code>", escaped)
    return re.sub(r"\*\*([^*]+)\*\*", r"<strong>\1</strong>", escaped)


def _embedded(alt: str, path: Path | None) -> str:
    if path is None or not path.is_file():
        return f"<p>[missing image: {html.escape(alt)}]</p>"
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return f"<figure><img alt='{html.escape(alt)}' src='data:image/png;base64,{data}'></figure>"
