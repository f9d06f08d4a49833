"""The diagnostic sections: each appends Markdown (and PNGs) to a :class:`Page` and returns its numbers.

Every section says in a sentence how to read it. Diagnostics are summarised per module kind (mean
over layers) in tables and drawn per layer × module kind in heatmaps; every per-module number also
goes to ``diagnostics.json``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch

from lorasoup.report.page import (
    ANGLES,
    CAT_WEIGHTS,
    CONFLICTS,
    ENERGY,
    RANK_SWEEP,
    Page,
    SkillSet,
    deg,
    mean,
    paths_by_kind,
    pct,
)
from lorasoup.report.plots import accuracy_rank_plot, energy_curves, grid_heatmap, weights_heatmap
from lorasoup.report.runs import Run

# --- CAT weights --------------------------------------------------------------------------------


def cat_weights_section(page: Page, cat_runs: Sequence[Run]) -> dict[str, Any]:
    """Heatmap of each CAT run's learned weights (layer × module × skill) and their spread per kind."""
    page.add(
        f"## {CAT_WEIGHTS}",
        "One weight per skill per module (or per layer, or one per skill), as trained; with the softmax "
        "parameterisation the skills' weights at a module sum to 1. A skill the composition leans on "
        "shows high weights where its LoRA matters.",
    )
    numbers = {}
    for run in cat_runs:
        payload = run.json("cat_weights.json")
        weights, initial = payload["weights"], payload.get("initial_weights") or {}
        page.add(f"### {run.label}")
        page.image(
            f"cat-weights-{run.label}",
            f"CAT weights of {run.label}",
            lambda path, w=weights, r=run: weights_heatmap(
                w, path, title=f"CAT's learned weights ({r.label})"
            ),
        )
        rows = []
        for adapter in payload["adapters"]:
            values = {group: per[adapter] for group, per in weights.items()}
            moved = [abs(values[g] - initial[g][adapter]) for g in values if g in initial]
            rows.append(
                [
                    adapter,
                    f"{mean(list(values.values())):.3f}",
                    f"{min(values.values()):.3f}",
                    f"{max(values.values()):.3f}",
                    f"{mean(moved):.3f}" if moved else "-",
                ]
            )
        page.table(["skill", "mean weight", "min", "max", "mean |w − w₀|"], rows)
        numbers[run.label] = payload
    return numbers


# --- principal angles ---------------------------------------------------------------------------


ANGLE_COLUMNS = [
    "module",
    "B: mean angle",
    "B: smallest",
    "B: random",
    "A: mean angle",
    "A: smallest",
    "A: random",
]


def _angle_rows(
    skills: SkillSet, first: str, second: str, modules: dict[str, Any], generator: torch.Generator
) -> list[list[Any]]:
    """One row per module kind: mean and smallest angles on each side, and the random baseline."""
    from lorasoup.diagnostics import random_subspace_angles

    rows = []
    for kind, paths in paths_by_kind(modules).items():
        out_dim, in_dim, r1, r2 = skills_factors(skills.adapters, first, second, paths[0])
        rows.append(
            [
                kind,
                deg(mean([modules[p].column_mean for p in paths])),
                deg(mean([modules[p].column_min for p in paths])),
                deg(random_subspace_angles(out_dim, r1, r2, generator)),
                deg(mean([modules[p].row_mean for p in paths])),
                deg(mean([modules[p].row_min for p in paths])),
                deg(random_subspace_angles(in_dim, r1, r2, generator)),
            ]
        )
    return rows


def angles_section(page: Page, skill_sets: Sequence[SkillSet], *, seed: int = 0) -> dict[str, Any]:
    """Mean principal angle per module between every pair of skills, output (B) and input (A) sides."""
    from lorasoup.diagnostics import adapter_angles

    page.add(
        f"## {ANGLES}",
        "Principal angles between two skills' LoRA subspaces at each module: the column spaces of B "
        "(what the update writes) and the row spaces of A (what it reads). 0° means the skills use the "
        "same directions and compete for them; 90° means disjoint directions, which concatenation adds "
        "without interference. The random column gives the mean angle between random subspaces of the "
        "same sizes: only a gap to it means something.",
    )
    generator = torch.Generator().manual_seed(seed)
    numbers: dict[str, Any] = {}
    for skills in skill_sets:
        page.add(f"### {skills.label} (from {skills.source})")
        for (first, second), modules in adapter_angles(skills.adapters).items():
            pair = f"{first} vs {second}"
            grid = {
                p: {"B columns (output side)": a.column_mean, "A rows (input side)": a.row_mean}
                for p, a in modules.items()
            }
            page.image(
                f"angles-{skills.label}-{pair}",
                f"principal angles {pair}",
                lambda path, g=grid, t=pair: grid_heatmap(
                    g,
                    path,
                    title=f"mean principal angle, {t}",
                    label="degrees",
                    limits=(0.0, 90.0),
                    cmap="magma",
                ),
            )
            page.add(f"{pair}, mean over layers:")
            page.table(ANGLE_COLUMNS, _angle_rows(skills, first, second, modules, generator))
            numbers[f"{skills.label}: {pair}"] = {
                p: {"column": a.column.tolist(), "row": a.row.tolist()} for p, a in modules.items()
            }
    return numbers


def skills_factors(adapters: Sequence[Any], first: str, second: str, path: str) -> tuple[int, int, int, int]:
    """``(out, in, r_first, r_second)`` of two named adapters at ``path``: the random baseline's sizes."""
    named = {a.name: a for a in adapters}
    a, b = named[first].modules[path], named[second].modules[path]
    return a.out_features, a.in_features, a.rank, b.rank


# --- TIES sign conflicts ------------------------------------------------------------------------


def conflicts_section(
    page: Page, skill_sets: Sequence[SkillSet], density: float, source: str
) -> dict[str, Any]:
    """Per module, how often the skills' trimmed updates disagree in sign (what TIES must arbitrate)."""
    from lorasoup.diagnostics import adapter_sign_conflicts

    page.add(
        f"## {CONFLICTS}",
        f"Each skill's update ΔW trimmed to its top {100 * density:g} % entries by magnitude (TIES' "
        f'density {density:g}, {source}); "conflict" is the share of all entries where kept values of '
        'different skills have opposite signs, "overlap" the share where two or more skills keep a '
        "value. TIES' sign election drops the losing side of every conflict; linear merging lets them "
        "cancel; CAT keeps both updates and only reweights them.",
    )
    numbers: dict[str, Any] = {}
    for skills in skill_sets:
        conflicts = adapter_sign_conflicts(skills.adapters, density)
        if not conflicts:
            continue
        page.add(f"### {skills.label} (from {skills.source})")
        grid = {
            p: {
                "conflict (% of entries)": 100 * c.conflict,
                "conflict among overlapping (%)": 100 * c.conflict_given_overlap,
            }
            for p, c in conflicts.items()
        }
        page.image(
            f"conflicts-{skills.label}",
            f"sign conflicts {skills.label}",
            lambda path, g=grid, s=skills: grid_heatmap(
                g,
                path,
                title=f"TIES sign conflicts, {s.label}, density {density:g}",
                label="%",
                cmap="inferno",
            ),
        )
        rows = []
        for kind, paths in paths_by_kind(conflicts).items():
            entries = sum(conflicts[p].entries for p in paths)
            conflict = sum(conflicts[p].conflict * conflicts[p].entries for p in paths) / entries
            overlap = sum(conflicts[p].overlap * conflicts[p].entries for p in paths) / entries
            rows.append([kind, pct(conflict), pct(overlap), pct(conflict / overlap if overlap else math.nan)])
        page.table(["module", "conflict (%)", "overlap (%)", "conflict among overlapping (%)"], rows)
        numbers[skills.label] = {
            "density": density,
            "modules": {
                p: {"conflict": c.conflict, "overlap": c.overlap, "entries": c.entries}
                for p, c in conflicts.items()
            },
        }
    return numbers


# --- recompression energy -----------------------------------------------------------------------


def energy_section(page: Page, targets: Sequence[tuple[str, Any, str]]) -> dict[str, Any]:
    """Energy kept vs rank per module for each adapter in ``targets`` (``(label, adapter, what)``)."""
    from lorasoup.diagnostics import adapter_energy, energy_at

    page.add(
        f"## {ENERGY}",
        "Share of each module's ‖ΔW‖² kept when the adapter is recompressed exactly to rank k (truncated "
        "SVD from the factors, as `lorasoup compress` and CAT's `export.rank` do). A curve that reaches "
        "~100 % early means the adapter can be served at that rank for little loss.",
    )
    numbers: dict[str, Any] = {}
    for label, adapter, what in targets:
        curves = {p: c.tolist() for p, c in adapter_energy(adapter).items()}
        full = max(len(c) for c in curves.values())
        ranks = sorted({min(2**i, full) for i in range(full.bit_length() + 1)})
        page.add(f"### {label}", f"{what}; largest module rank {full}.")
        page.image(
            f"energy-{label}",
            f"energy kept {label}",
            lambda path, c=curves, t=label: energy_curves(c, path, title=f"energy kept vs rank, {t}"),
        )
        rows = []
        for kind, paths in paths_by_kind(curves).items():
            kept = [[energy_at(torch.tensor(curves[p]), k) for p in paths] for k in ranks]
            rows.append(
                [kind, *(pct(mean(v)) + (f" (min {pct(min(v))})" if len(v) > 1 else "") for v in kept)]
            )
        page.table(["module", *(f"k={k} (%)" for k in ranks)], rows)
        numbers[label] = curves
    return numbers


# --- accuracy vs rank ---------------------------------------------------------------------------


def rank_sweep_section(page: Page, sweeps: Sequence[tuple[str, str, list[Any]]]) -> dict[str, Any]:
    """Accuracy of each swept adapter at each rank (``(label, task, points)``)."""
    page.add(
        f"## {RANK_SWEEP}",
        'The composed adapter recompressed exactly to each rank and scored again; "full" is the '
        "adapter as exported. Energy kept is over modules (mean and worst).",
    )
    numbers: dict[str, Any] = {}
    for label, task, points in sweeps:
        rows = [
            [
                "full" if p.rank is None else p.rank,
                pct(p.accuracy),
                pct(p.mean_energy_kept),
                pct(p.min_energy_kept),
                p.summary.get("examples", "-"),
            ]
            for p in points
        ]
        plain = [
            {
                "rank": p.rank,
                "accuracy": p.accuracy,
                "mean_energy_kept": p.mean_energy_kept,
                "min_energy_kept": p.min_energy_kept,
            }
            for p in points
        ]
        page.add(f"### {label} on {task}")
        page.table(["rank", "accuracy (%)", "energy kept, mean (%)", "worst module (%)", "examples"], rows)
        page.image(
            f"rank-sweep-{label}",
            f"accuracy vs rank {label}",
            lambda path, pts=plain, t=f"{label} on {task}": accuracy_rank_plot(pts, path, title=t),
        )
        numbers[label] = {"task": task, "points": plain}
    return numbers
