"""``lorasoup study CONFIG``: the demo study over a ladder of base model sizes (issue 11).

Does composition appear, and does CAT overtake DATA-MIX and the merges, as the base model grows?
The config (:class:`StudyConfig`, docs/study.md) names the sizes, each a set of
:class:`~lorasoup.demo.study.DemoSettings` overrides laid over settings shared by all (``base``).
Each size runs the whole demo (``run_demo``'s work, every seed) into ``OUTPUT/<name>/``, with its own
report, written atomically as the demo writes it; ``scale_report.py`` then writes
``OUTPUT/scaling.{md,html,json,png}`` and ``OUTPUT/run.json`` from whatever sizes are finished.

Splitting a study: ``only`` runs some sizes (one process per GPU, ``--only``), ``report_only``
rebuilds the scaling report from the finished ``OUTPUT/<name>/results.json`` folders. A size whose
folder already holds a finished run with the same settings and seeds is kept, not run again (so a
study cut short resumes where it stopped); a folder with other settings is an error unless
``overwrite``. With ``resume`` an unfinished size resumes too: it works in ``OUTPUT/.<name>.partial``
(``artifacts.resumable_output_dir``), which a stop leaves behind, and the next run keeps its
pre-trained bases, trained LoRAs and scored rows (the demo's own ``resume``), its seconds counted over
both runs.

With ``jobs > 1`` every seed of every size is one unit of work, ``jobs`` of them at once in worker
processes (``seeds.py``). Units start size by size in the config's order, so sizes finish (and their
folders appear) one after another: a study stopped part way keeps its finished sizes.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lorasoup.config import build, require
from lorasoup.demo.scale_report import comparable, write_scaling
from lorasoup.demo.settings import DemoSettings, StageHook
from lorasoup.errors import ConfigError, LorasoupError

RESERVED = ("scaling.md", "scaling.html", "scaling.json", "scaling.png", "run.json")
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


@dataclass
class SizePreset:
    """One rung of the ladder: a folder name and its ``DemoSettings`` overrides.

    ``set``: a mapping of fields to values, dotted (``base.layers: 6``) or nested
    (``base: {layers: 6}``), laid over the study's shared ``base`` settings.
    """

    name: str
    set: Any = field(default_factory=dict)


@dataclass
class StudyConfig:
    """A scaling study: the seeds, the settings every size shares, and the sizes (docs/study.md).

    ``seeds``: a count (``seed``, ``seed + 1``, ...) or a list; ``base``: ``DemoSettings``
    overrides for every size (dotted or nested, as ``set``); ``jobs``: seeds run at once, in worker
    processes (1: one after another in this process).
    """

    sizes: list[SizePreset]
    seeds: int | list[int] = 3
    seed: int = 0
    base: Any = field(default_factory=dict)
    jobs: int = 1
    output: str = "runs/study"

    def validate(self) -> None:
        from lorasoup.demo.run import seed_list

        require(bool(self.sizes), "sizes: list at least one size")
        require(self.jobs >= 1, f"jobs must be at least 1, got {self.jobs}")
        require(not isinstance(self.seeds, int) or self.seeds >= 1, f"seeds must be >= 1, got {self.seeds}")
        seed_list(self.seed, self.seeds)
        names = [preset.name for preset in self.sizes]
        for index, name in enumerate(names):
            require(
                bool(_NAME.fullmatch(name)) and name not in RESERVED,
                f"sizes[{index}].name {name!r}: use letters, digits, '.', '_' or '-' (a folder name), "
                f"not one of {', '.join(RESERVED)}",
            )
            require(names.count(name) == 1, f"sizes[{index}].name {name!r} is used twice; names must differ")
        shared = _overrides(self.base, "base")
        build(DemoSettings, _nested(shared), "base")  # the shared part alone: errors name `base`
        for index, preset in enumerate(self.sizes):
            self.settings(preset, where=f"sizes[{index}].set")

    @property
    def seed_list(self) -> list[int]:
        from lorasoup.demo.run import seed_list

        return seed_list(self.seed, self.seeds)

    def settings(self, preset: SizePreset, *, where: str = "") -> DemoSettings:
        """The ``DemoSettings`` of one size: ``base``, then the size's ``set``."""
        merged = {**_overrides(self.base, "base"), **_overrides(preset.set, where or f"{preset.name}.set")}
        return build(DemoSettings, _nested(merged), where or f"{preset.name}.set")

    def preset(self, name: str) -> SizePreset:
        for preset in self.sizes:
            if preset.name == name:
                return preset
        raise ConfigError(f"no size named {name!r}; the config has {', '.join(self.names)}")

    @property
    def names(self) -> list[str]:
        return [preset.name for preset in self.sizes]


def _overrides(value: Any, where: str) -> dict[str, Any]:
    """A mapping of settings (dotted keys or nested mappings) as ``{"dotted.key": value}``."""
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise ConfigError(
            f"{where}: expected a mapping of DemoSettings fields to values "
            f"(e.g. {{base.layers: 6}}), got {value!r}"
        )
    flat: dict[str, Any] = {}
    for key, item in value.items():
        if not isinstance(key, str) or not key:
            raise ConfigError(f"{where}: keys must be field names, got {key!r}")
        if isinstance(item, Mapping):
            flat.update({f"{key}.{k}": v for k, v in _overrides(item, f"{where}.{key}").items()})
        else:
            flat[key] = item
    return flat


def _nested(flat: Mapping[str, Any]) -> dict[str, Any]:
    """``{"base.layers": 6}`` → ``{"base": {"layers": 6}}``."""
    data: dict[str, Any] = {}
    for key, value in flat.items():
        *parents, last = key.split(".")
        node = data
        for part in parents:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"setting {key!r}: {part!r} is a value, not a section")
            node = child
        node[last] = value
    return data


@dataclass
class StudySummary:
    """What :func:`run_study` did: the output, the sizes run now and kept, the scaling report's data."""

    output: Path
    ran: list[str]
    kept: list[str]
    scaling: dict[str, Any]
    seconds: float


def run_study(
    config: StudyConfig,
    *,
    output: str | Path | None = None,
    only: Sequence[str] | None = None,
    overwrite: bool = False,
    report_only: bool = False,
    stage: StageHook | None = None,
    resume: bool = False,
) -> StudySummary:
    """Run the sizes of ``config`` (``only``: some of them) and write the scaling report.

    ``report_only``: run nothing; rebuild ``scaling.*`` and ``run.json`` from the finished sizes.
    ``resume``: an unfinished size goes on where a stopped run left it (module docstring).
    """
    from lorasoup.demo.device import resolve_device

    started = time.perf_counter()
    out = Path(output or config.output)
    chosen = [config.preset(name) for name in dict.fromkeys(only)] if only else list(config.sizes)
    ran: list[str] = []
    kept: list[str] = []
    if not report_only:
        for preset in chosen:  # before any work: a GPU asked for and missing is a one-line error
            resolve_device(config.settings(preset).device)
        todo, kept = _plan(out, config, chosen, overwrite=overwrite)
        if todo:
            ran = _run_sizes(out, config, todo, overwrite=overwrite, stage=stage, resume=resume)
    elif not out.is_dir():
        raise LorasoupError(f"--report-only: {out} does not exist; run the study into it first")
    scaling = write_scaling(out, config, ran=ran, seconds=time.perf_counter() - started)
    return StudySummary(out, ran, kept, scaling, time.perf_counter() - started)


def _plan(
    out: Path, config: StudyConfig, chosen: list[SizePreset], *, overwrite: bool
) -> tuple[list[SizePreset], list[str]]:
    """Which sizes to run and which finished ones to keep; refuses, before any work, to replace a
    finished size whose settings or seeds differ unless ``overwrite``."""
    from lorasoup.demo.settings import settings_record

    todo, kept = [], []
    for preset in chosen:
        folder = out / preset.name
        if not folder.exists():
            todo.append(preset)
            continue
        if overwrite:
            todo.append(preset)
            continue
        wanted = {"settings": comparable(settings_record(config.settings(preset))), "seeds": config.seed_list}
        found = _finished(folder)
        if found is not None and json.loads(json.dumps(wanted)) == found:
            kept.append(preset.name)
            continue
        raise LorasoupError(
            f"{folder} holds {'a run with other settings or seeds' if found else 'no finished run'}; "
            "pass --overwrite to replace it, or choose another --output"
        )
    return todo, kept


def _finished(folder: Path) -> dict[str, Any] | None:
    """The settings and seeds of a finished size folder (its ``results.json``), or None."""
    try:
        results = json.loads((folder / "results.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return {"settings": comparable(results.get("settings") or {}), "seeds": results.get("seeds")}


def _run_sizes(
    out: Path,
    config: StudyConfig,
    todo: list[SizePreset],
    *,
    overwrite: bool,
    stage: StageHook | None,
    resume: bool = False,
) -> list[str]:
    """Run every seed of every size in ``todo``, in that order; each size's folder appears when its
    seeds are done, and a failure removes the unfinished sizes' staging folders (with ``resume``, it
    keeps them for the next run)."""
    from lorasoup.artifacts import atomic_output_dir, resumable_output_dir
    from lorasoup.demo.run import RunClock, resume_fingerprint, seed_units, write_demo
    from lorasoup.demo.seeds import run_units

    seeds = config.seed_list
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    open_dirs: dict[str, AbstractContextManager[Path]] = {}
    clocks: dict[str, RunClock] = {}  # each size's seconds, over the runs a resumed size took
    units, owner = [], []
    try:
        for preset in todo:
            settings = config.settings(preset)
            target = out / preset.name
            if resume:
                fingerprint = resume_fingerprint("tiny", seeds, settings)
                context = resumable_output_dir(target, fingerprint, overwrite=overwrite)
            else:
                context = atomic_output_dir(target, overwrite=overwrite)
            staging = context.__enter__()
            open_dirs[preset.name] = context
            clocks[preset.name] = RunClock(staging / "elapsed.json" if resume else None, started)
            units += seed_units(staging, seeds, settings, "tiny", label=preset.name)
            owner += [preset] * len(seeds)
        outcomes: dict[str, dict[int, Any]] = {preset.name: {} for preset in todo}

        def timed(what: str, done: int, total: int) -> None:
            for name in open_dirs:  # the sizes still running: a stop keeps their time so far
                clocks[name].save()
            if stage is not None:
                stage(what, done, total)

        def finish(index: int, outcome: Any) -> None:
            preset, unit = owner[index], units[index]
            outcomes[preset.name][unit.seed] = outcome
            if len(outcomes[preset.name]) == len(seeds):
                folder = unit.folder.parent
                ordered = [outcomes[preset.name][s] for s in seeds]
                settings = unit.settings
                seconds = clocks[preset.name].finish()
                write_demo(folder, ordered, seeds, settings, "tiny", seconds, jobs=config.jobs)
                open_dirs.pop(preset.name).__exit__(None, None, None)  # the size's folder appears

        run_units(units, jobs=config.jobs, stage=timed, on_done=finish, resume=resume)
    except BaseException as error:
        for context in open_dirs.values():  # unfinished sizes leave nothing behind
            context.__exit__(type(error), error, error.__traceback__)
        raise
    return [preset.name for preset in todo]
