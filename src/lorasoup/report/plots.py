"""The report's figures, as PNG files.

Figures are built with ``matplotlib.figure.Figure`` directly (no pyplot): no global backend or figure
registry is touched, nothing is left open, and it works on a headless machine.

Most diagnostics are one number per adapted module; :func:`module_grid` lays such numbers out as
layers (rows) × module kinds (columns), the picture :func:`grid_heatmap` draws.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

_LAYER = re.compile(r"(?:^|\.)(?:layers|h|blocks|layer)\.(\d+)\.")


def _figure(width: float, height: float, *, layout: str | None = None) -> Any:
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), layout=layout)


def methods_bar_chart(
    rows: Sequence[Mapping[str, Any]], tasks: Sequence[str], path: Path, *, title: str
) -> Path:
    """Grouped bars: one group per method, one bar per task (mean, with the std as an error bar).

    ``rows``: ``{"method": str, task: {"mean": float, "std": float}, ...}``.
    """
    width = 0.8 / len(tasks)
    fig = _figure(max(6.0, 0.9 * len(rows) + 2), 4.2)
    ax = fig.subplots()
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
    return path


def module_kind(path: str) -> str:
    """A module path's kind, the last name: ``model.layers.3.mlp.up_proj`` → ``up_proj``."""
    return path.rsplit(".", 1)[-1]


def module_layer(path: str) -> int | None:
    """A module path's layer index, or None when it has none."""
    match = _LAYER.search(path)
    return int(match.group(1)) if match else None


def weights_grid(
    weights: Mapping[str, Mapping[str, float]],
) -> tuple[list[int], list[str], dict[str, list[list[float]]]]:
    """``cat_weights.json`` weights (group → adapter → w) as a layer × module grid per adapter.

    Groups are module paths (``model.layers.3.mlp.up_proj``), layers (``layer.3``) or ``global``;
    cells with no group are NaN. Any ``{module path: {series: value}}`` mapping works the same way.
    """
    cells: dict[tuple[int, str], Mapping[str, float]] = {}
    for group, per_adapter in weights.items():
        match = _LAYER.search(group) or re.match(r"layer\.(\d+)$", group)
        layer = int(match.group(1)) if match else 0
        module = module_kind(group) if match and not group.startswith("layer.") else group.split(".")[0]
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


def grid_heatmap(
    values: Mapping[str, Mapping[str, float]],
    path: Path,
    *,
    title: str,
    label: str,
    limits: tuple[float, float] | None = None,
    cmap: str = "viridis",
) -> Path:
    """One heatmap panel per series of ``values`` (module path → series → number): layers down,
    module kinds across, one shared colour scale (``limits``, or the data's range) labelled ``label``."""
    layers, modules, grids = weights_grid(values)
    if limits is None:
        finite = [v for grid in grids.values() for row in grid for v in row if math.isfinite(v)]
        limits = (min(finite), max(finite)) if finite else (0.0, 1.0)
    fig = _figure(
        1.2 + (0.55 * len(modules) + 0.6) * len(grids), 1.6 + 0.35 * len(layers), layout="constrained"
    )
    axes = fig.subplots(1, len(grids), squeeze=False)[0]
    image = None
    for ax, (series, grid) in zip(axes, grids.items(), strict=True):
        image = ax.imshow(grid, cmap=cmap, vmin=limits[0], vmax=limits[1], aspect="auto")
        ax.set_title(series, fontsize=9)
        ax.set_xticks(range(len(modules)))
        ax.set_xticklabels(modules, rotation=60, ha="right", fontsize=7)
        ax.set_yticks(range(len(layers)))
        ax.set_yticklabels([f"layer {layer}" for layer in layers], fontsize=7)
    fig.colorbar(image, ax=list(axes), shrink=0.9, label=label)
    fig.suptitle(title, fontsize=10)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    return path


def weights_heatmap(weights: Mapping[str, Mapping[str, float]], path: Path, *, title: str) -> Path:
    """One heatmap per adapter of CAT's learned weights: layers down, modules across."""
    return grid_heatmap(weights, path, title=title, label="weight")


def energy_curves(curves: Mapping[str, Sequence[float]], path: Path, *, title: str) -> Path:
    """Energy kept vs rank, one line per module kind (mean over layers) with the min–max band.

    ``curves``: module path → energy kept at rank 1, 2, … (a :func:`lorasoup.diagnostics.energy_kept`
    curve); curves of one kind may differ in length (shorter ones are at 1 beyond their end).
    """
    kinds: dict[str, list[Sequence[float]]] = {}
    for module, curve in curves.items():
        kinds.setdefault(module_kind(module), []).append(curve)
    fig = _figure(6.4, 4.0)
    ax = fig.subplots()
    for kind, members in sorted(kinds.items()):
        length = max(len(c) for c in members)
        padded = [[*c, *([1.0] * (length - len(c)))] for c in members]
        ranks = list(range(1, length + 1))
        columns = list(zip(*padded, strict=True))
        ax.plot(ranks, [100 * sum(c) / len(c) for c in columns], marker=".", label=kind)
        ax.fill_between(ranks, [100 * min(c) for c in columns], [100 * max(c) for c in columns], alpha=0.15)
    ax.set_xlabel("rank k kept")
    ax.set_ylabel("energy kept (% of ‖ΔW‖²)")
    ax.set_ylim(0, 101)
    ax.grid(alpha=0.3)
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return path


def accuracy_rank_plot(points: Sequence[Mapping[str, Any]], path: Path, *, title: str) -> Path:
    """Accuracy (and mean energy kept) vs the rank an adapter was recompressed to.

    ``points``: ``{"rank": int | None, "accuracy": float, "mean_energy_kept": float}``; the point with
    rank None (the adapter as it is) is drawn as a dashed reference line.
    """
    swept = sorted((p for p in points if p["rank"] is not None), key=lambda p: p["rank"])
    full = next((p for p in points if p["rank"] is None), None)
    fig = _figure(6.0, 3.8)
    ax = fig.subplots()
    ranks = [p["rank"] for p in swept]
    ax.plot(ranks, [100 * p["accuracy"] for p in swept], marker="o", label="accuracy")
    ax.plot(
        ranks, [100 * p["mean_energy_kept"] for p in swept], marker="s", ls=":", label="energy kept (mean)"
    )
    if full is not None:
        ax.axhline(100 * full["accuracy"], color="grey", ls="--", lw=1, label="accuracy, full rank")
    ax.set_xscale("log", base=2)
    ax.set_xticks(ranks)
    ax.set_xticklabels([str(r) for r in ranks])
    ax.set_xlabel("rank after recompression")
    ax.set_ylabel("%")
    ax.set_ylim(-3, 105)  # a line at 0 % stays visible above the axis
    ax.grid(alpha=0.3)
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return path


def accuracy_vs_size(
    panels: Sequence[Mapping[str, Sequence[tuple[float, float, float]]]],
    path: Path,
    *,
    titles: Sequence[str],
    ceiling: str | None = None,
) -> Path:
    """Accuracy against model size: one panel per mapping of ``panels``, one line per method.

    Each method maps to ``(parameters, mean %, std %)`` points (std as error bars); the x axis is
    logarithmic. ``ceiling``: the method drawn as a dashed black line (the oracle).
    """
    fig = _figure(6.0 * len(panels), 4.4, layout="constrained")
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    for ax, series, title in zip(axes, panels, titles, strict=True):
        for method, points in series.items():
            if not points:
                continue
            xs, means, stds = zip(*points, strict=True)
            style = {"color": "black", "ls": "--"} if method == ceiling else {"marker": "o"}
            ax.errorbar(xs, means, yerr=stds, capsize=2, label=method, **style)
        ax.set_xscale("log")
        ax.set_xlabel("base model parameters")
        ax.set_ylabel("accuracy (%)")
        ax.set_ylim(-3, 105)
        ax.grid(alpha=0.3)
        ax.set_title(title, fontsize=10)
    axes[0].legend(fontsize=7)
    fig.savefig(path, dpi=120)
    return path
