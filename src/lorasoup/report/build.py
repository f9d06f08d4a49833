"""``lorasoup report RUN_DIR...``: one static Markdown + HTML page over several runs.

Reads each run directory (see ``runs.py``), renders the sections that apply (``sections.py``) and
writes, atomically, ``OUTPUT/``:

- ``report.md`` with the PNGs beside it, and ``report.html`` with the same PNGs embedded (one file);
- ``diagnostics.json``: every per-module number behind the tables and figures;
- ``run.json``: the config, versions, timings and the runs read.

Diagnostics come from the skills each CAT or merge run composed (or ``adapters``), the recompression
energy from each CAT run's exported adapter. Accuracy vs rank needs a model and a task: it runs only
when ``rank_sweep`` is given, on each CAT run (the demo's own composite task for a demo).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lorasoup.config import require
from lorasoup.errors import ConfigError
from lorasoup.report.page import Page, SkillSet
from lorasoup.report.runs import Run, label_runs, load_skills, read_run, skill_refs, ties_density
from lorasoup.report.sections import (
    angles_section,
    cat_weights_section,
    conflicts_section,
    energy_section,
    rank_sweep_section,
)
from lorasoup.report.sweep import SweepProvider
from lorasoup.report.tables import results_section

DEFAULT_DENSITY = 0.2  # TIES' own default (k = 20 %), https://arxiv.org/abs/2306.01708
Progress = Callable[[str], None]


@dataclass
class ReportConfig:
    """What ``lorasoup report`` reads and computes; see docs/report.md."""

    runs: list[str]
    output: str = "runs/report"
    adapters: list[str] = field(default_factory=list)
    density: float | None = None
    rank_sweep: list[int] = field(default_factory=list)
    task: str | None = None
    data: list[str] = field(default_factory=list)
    fewshot: str | None = None
    limit: int | None = None
    base_model: str | None = None
    device: str | None = None
    batch_size: int | None = None
    seed: int = 0
    overwrite: bool = False

    def validate(self) -> None:
        require(bool(self.runs), "give at least one run directory")
        require(
            self.density is None or 0.0 < self.density <= 1.0,
            f"--density must be in (0, 1], got {self.density}",
        )
        require(
            all(r >= 1 for r in self.rank_sweep), f"--rank-sweep ranks must be >= 1, got {self.rank_sweep}"
        )
        require(len(self.adapters) != 1, "--adapters needs two or more skill adapters to compare")
        require(self.limit is None or self.limit >= 1, f"--limit must be at least 1, got {self.limit}")


@dataclass
class ReportResult:
    output: Path
    runs: list[Run]
    sections: list[str]
    seconds: float


def build_report(
    config: ReportConfig,
    *,
    progress: Progress | None = None,
    sweep_inputs: Mapping[str, SweepProvider] | None = None,
) -> ReportResult:
    """Read ``config.runs``, compute the diagnostics and write the report (see the module doc)."""
    from lorasoup.artifacts import atomic_output_dir, require_free_output, write_json_atomic
    from lorasoup.report.markdown import markdown_to_html

    config.validate()
    output = Path(config.output)
    require_free_output(output, overwrite=config.overwrite)
    started = time.perf_counter()
    say = progress or (lambda _: None)
    runs = [read_run(path) for path in config.runs]
    label_runs(runs)
    every = [c for r in runs for c in (r, *r.children)]
    cat_runs = [r for r in every if r.kind == "cat"]
    _check_sweep(config, runs, cat_runs, sweep_inputs or {})
    skill_sets = _skill_sets(config, every)
    timings: dict[str, float] = {}
    with atomic_output_dir(output, overwrite=config.overwrite) as staging:
        page = Page(folder=staging)
        page.add("# lorasoup report")
        page.add(*(f"- `{r.path}`: {r.kind} run" for r in runs))
        numbers: dict[str, Any] = {}
        sections: list[str] = []

        def section(name: str, key: str, make: Callable[[], Any]) -> None:
            say(name)
            clock = time.perf_counter()
            numbers[key] = make()
            timings[key] = time.perf_counter() - clock
            sections.append(name)

        section("results", "results", lambda: results_section(page, runs))
        if cat_runs:
            section("CAT weights", "cat_weights", lambda: cat_weights_section(page, cat_runs))
        if skill_sets:
            density, source = _density(config, every)
            section("principal angles", "angles", lambda: angles_section(page, skill_sets, seed=config.seed))
            section(
                "sign conflicts",
                "sign_conflicts",
                lambda: conflicts_section(page, skill_sets, density, source),
            )
        targets = _energy_targets(cat_runs, skill_sets)
        if targets:
            section("recompression energy", "energy", lambda: energy_section(page, targets))
        if config.rank_sweep:
            sweeps = _rank_sweeps(config, runs, cat_runs, say, sweep_inputs or {})
            section("accuracy vs rank", "rank_sweep", lambda: rank_sweep_section(page, sweeps))
        (staging / "report.md").write_text(page.markdown, encoding="utf-8")
        html = markdown_to_html(page.markdown, title="lorasoup report", images=page.images)
        (staging / "report.html").write_text(html, encoding="utf-8")
        write_json_atomic(staging / "diagnostics.json", numbers)
        seconds = time.perf_counter() - started
        timings["total"] = seconds
        _write_run_json(staging, config, timings, every, sections, page)
    return ReportResult(output=output, runs=runs, sections=sections, seconds=seconds)


def _write_run_json(
    staging: Path,
    config: ReportConfig,
    timings: dict[str, float],
    every: list[Run],
    sections: list[str],
    page: Page,
) -> None:
    from lorasoup.artifacts import run_record, write_json_atomic

    write_json_atomic(
        staging / "run.json",
        run_record(
            command="report",
            config=config,
            seed=config.seed,
            timings=timings,
            runs=[{"path": str(r.path), "kind": r.kind, "label": r.label} for r in every],
            sections=sections,
            images=sorted(page.images),
        ),
    )


def _check_sweep(
    config: ReportConfig, runs: list[Run], cat_runs: list[Run], providers: Mapping[str, SweepProvider]
) -> None:
    """Before any work: a rank sweep needs a CAT run, and a task unless every CAT run is inside a run
    whose kind brings its own (a demo's, with the demo's provider)."""
    if not config.rank_sweep:
        return
    if not cat_runs:
        raise ConfigError("--rank-sweep recompresses a CAT run's adapter: give a cat or demo run directory")
    in_demos = {id(child) for run in runs if run.kind in providers for child in run.children}
    outside = [run for run in cat_runs if id(run) not in in_demos]
    if outside and config.task is None:
        raise ConfigError(
            f"--rank-sweep on {outside[0].path} scores a task: give --task NAME_OR_YAML and --data FILE "
            "(a demo run needs neither)"
        )


def _skill_sets(config: ReportConfig, every: list[Run]) -> list[SkillSet]:
    """``--adapters``, or each distinct set of two or more skills a CAT or merge run composed."""
    if config.adapters:
        return [SkillSet("--adapters", load_skills([(None, a) for a in config.adapters]))]
    sets: dict[tuple[str, ...], SkillSet] = {}
    for run in every:
        refs = skill_refs(run)
        key = tuple(sorted(str(Path(p).resolve()) if Path(p).exists() else p for _, p in refs))
        if len(refs) >= 2 and key not in sets:
            sets[key] = SkillSet(run.label, load_skills(refs))
    return list(sets.values())


def _density(config: ReportConfig, every: list[Run]) -> tuple[float, str]:
    if config.density is not None:
        return config.density, "as asked with --density"
    found = ties_density(every)
    if found is not None:
        return found, "the TIES density of the runs"
    return DEFAULT_DENSITY, "TIES' default; change it with --density"


def _energy_targets(cat_runs: list[Run], skill_sets: list[SkillSet]) -> list[tuple[str, Any, str]]:
    """Each CAT run's exported adapter; without CAT runs, the skills themselves."""
    from lorasoup.adapters import load_adapter

    if cat_runs:
        return [
            (run.label, load_adapter(run.path, name=run.label), "CAT's exported adapter (weights folded in)")
            for run in cat_runs
        ]
    seen: dict[str, Any] = {}
    for skills in skill_sets:
        for adapter in skills.adapters:
            seen.setdefault(adapter.source, adapter)
    return [(a.name, a, "skill adapter") for a in seen.values()]


def _rank_sweeps(
    config: ReportConfig,
    runs: list[Run],
    cat_runs: list[Run],
    say: Progress,
    providers: Mapping[str, SweepProvider],
) -> list[tuple[str, str, list[Any]]]:
    """Accuracy vs rank for each CAT run: its parent run kind's provider (the demo's composite task
    for a demo's), else ``--task``."""
    from lorasoup.adapters import load_adapter
    from lorasoup.diagnostics import accuracy_vs_rank
    from lorasoup.report.sweep import task_sweep_inputs

    parents = {id(child): run for run in runs for child in run.children}
    sweeps = []
    for run in cat_runs:
        parent = parents.get(id(run))
        if parent is not None and parent.kind in providers:
            inputs = providers[parent.kind](parent, run)
        else:
            inputs = task_sweep_inputs(config, run)
        adapter = load_adapter(run.path, name=run.label)
        points = accuracy_vs_rank(
            inputs.model,
            inputs.tokenizer,
            inputs.task,
            inputs.examples,
            adapter,
            config.rank_sweep,
            inputs.settings,
            sandbox=inputs.sandbox,
            progress=lambda what, label=run.label: say(f"accuracy vs rank: {label}, {what}"),
        )
        sweeps.append((run.label, inputs.task.name, points))
    return sweeps
