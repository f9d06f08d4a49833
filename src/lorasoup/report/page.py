"""The page a report is written on, and the small formatting helpers its sections share."""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lorasoup.report.markdown import markdown_table
from lorasoup.report.plots import module_kind

RESULTS = "Results"
CAT_WEIGHTS = "CAT's learned weights"
ANGLES = "Principal angles between the skills' subspaces"
CONFLICTS = "TIES sign conflicts"
ENERGY = "Recompression energy kept"
RANK_SWEEP = "Accuracy vs rank after recompression"
SECTIONS = (RESULTS, CAT_WEIGHTS, ANGLES, CONFLICTS, ENERGY, RANK_SWEEP)


@dataclass
class Page:
    """The report being written: Markdown lines, and the PNGs they show (written into ``folder``)."""

    folder: Path
    lines: list[str] = field(default_factory=list)
    images: dict[str, Path] = field(default_factory=dict)

    def add(self, *lines: str) -> None:
        self.lines.extend([*lines, ""])

    def table(self, headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
        self.add(markdown_table(headers, [[str(cell) for cell in row] for row in rows]).rstrip("\n"))

    def image(self, stem: str, alt: str, draw: Callable[[Path], Path]) -> None:
        """Draw a PNG named after ``stem`` (made unique) and show it."""
        name = f"{slug(stem)}.png"
        count = 2
        while name in self.images:
            name, count = f"{slug(stem)}-{count}.png", count + 1
        self.images[name] = draw(self.folder / name)
        self.add(f"![{alt}]({name})")

    @property
    def markdown(self) -> str:
        return "\n".join(self.lines).rstrip("\n") + "\n"


@dataclass
class SkillSet:
    """Skill adapters composed together somewhere in the runs (or given with ``--adapters``)."""

    source: str
    adapters: list[Any]

    @property
    def label(self) -> str:
        return " + ".join(a.name for a in self.adapters)


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "figure"


def pct(value: float | None) -> str:
    return "-" if value is None or not math.isfinite(value) else f"{100 * value:.1f}"


def deg(value: float) -> str:
    return "-" if not math.isfinite(value) else f"{value:.1f}°"


def mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else math.nan


def paths_by_kind(modules: Mapping[str, Any]) -> dict[str, list[str]]:
    """Module paths grouped by module kind, kinds and paths sorted."""
    kinds: dict[str, list[str]] = {}
    for path in sorted(modules):
        kinds.setdefault(module_kind(path), []).append(path)
    return dict(sorted(kinds.items()))
