"""What a run directory is, and what it points to.

Every lorasoup command writes ``run.json`` whose ``command`` names it; the kind is read from there and
checked against the files that kind always writes. Paths recorded in ``run.json`` (the skills a CAT
run composed, its base model) may no longer exist where they were written: the demo builds its runs
in a temporary directory that is renamed into place, and users move run folders. Such a path is
looked up again relative to where the run itself now lives (:func:`relocate`).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lorasoup.artifacts import RUN_JSON
from lorasoup.errors import AdapterError, LorasoupError

# The files each kind of run always writes beside run.json.
REQUIRED_FILES = {
    "demo": ("results.json",),
    "cat": ("cat_weights.json", "adapter_config.json"),
    "merge": ("merge_report.json", "adapter_config.json"),
    "compress": ("merge_report.json", "adapter_config.json"),
    "eval": ("summary.json",),
    "train": ("adapter_config.json",),
}
TIES_FAMILY = ("ties", "dare_ties", "ties_factor", "dare_ties_factor")


@dataclass
class Run:
    """A run directory: its kind (``run.json``'s command), its record, and a short label for tables."""

    path: Path
    kind: str
    record: dict[str, Any]
    label: str = ""
    children: list[Run] = field(default_factory=list)

    def json(self, name: str) -> Any:
        return read_json(self.path / name)

    @property
    def config(self) -> dict[str, Any]:
        config = self.record.get("config")
        return config if isinstance(config, dict) else {}

    def locate(self, recorded: str) -> Path | None:
        """A path recorded in this run's config, as it is now (see :func:`relocate`)."""
        return relocate(recorded, recorded_output=self.config.get("output"), actual_output=self.path)


def read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise LorasoupError(f"{path} is missing; is {path.parent} a finished lorasoup run?") from None
    except (OSError, UnicodeDecodeError, ValueError) as err:
        raise LorasoupError(f"{path}: not readable JSON ({err}); rerun the command that wrote it") from None


def read_run(path: str | Path) -> Run:
    """The run in ``path``, its kind checked against its files; a demo gets its first seed's runs."""
    folder = Path(path).expanduser()
    kinds = ", ".join(REQUIRED_FILES)
    if not folder.is_dir():
        raise LorasoupError(f"{folder}: not a directory; pass run directories written by lorasoup ({kinds})")
    if not (folder / RUN_JSON).is_file():
        raise LorasoupError(f"{folder}: no {RUN_JSON}; pass a run directory written by lorasoup ({kinds})")
    record = read_json(folder / RUN_JSON)
    kind = record.get("command") if isinstance(record, dict) else None
    if kind not in REQUIRED_FILES:
        raise LorasoupError(
            f"{folder / RUN_JSON}: command {kind!r} has no report; the report reads runs of {kinds}"
        )
    missing = [name for name in REQUIRED_FILES[kind] if not (folder / name).is_file()]
    if missing:
        raise LorasoupError(
            f"{folder}: a {kind} run without {', '.join(missing)}; copy the whole folder or rerun the command"
        )
    run = Run(path=folder, kind=kind, record=record)
    if kind == "demo":
        run.children = demo_children(run)
    return run


def demo_children(demo: Run) -> list[Run]:
    """The first seed's CAT run and merges, which the report's diagnostics read."""
    seeds = demo.json("results.json").get("seeds") or []
    if not seeds:
        return []
    seed_dir = demo.path / f"seed-{seeds[0]}"
    found = [seed_dir / "cat", *sorted((seed_dir / "merges").glob("*"))]
    return [read_run(p) for p in found if (p / RUN_JSON).is_file()]


def label_runs(runs: list[Run]) -> None:
    """Give each run the shortest distinct label made of its path's last parts."""
    for depth in range(1, 8):
        labels = ["/".join(run.path.resolve().parts[-depth:]) for run in runs]
        if len(set(labels)) == len(labels) or depth == 7:
            break
    for run, label in zip(runs, labels, strict=True):
        run.label = label
        for child in run.children:
            child.label = f"{label}/{child.path.relative_to(run.path).as_posix()}"


def relocate(recorded: str, *, recorded_output: str | None, actual_output: Path) -> Path | None:
    """Where a path written into a run's ``run.json`` is now, or None.

    As written, if it exists; else the same relative position from the run's current directory as it
    had from the run's recorded ``output`` (a demo's ``/tmp/.demo.tmp-x/seed-0/adapters/math`` seen from
    ``/tmp/.demo.tmp-x/seed-0/cat`` is ``../adapters/math``).
    """
    path = Path(recorded).expanduser()
    if path.exists():
        return path
    if recorded_output:
        moved = Path(os.path.normpath(actual_output / os.path.relpath(path, recorded_output)))
        if moved.exists():
            return moved
    return None


def skill_refs(run: Run) -> list[tuple[str | None, str]]:
    """``(name, path)`` of the skill adapters a cat or merge run composed, relocated; ``[]`` otherwise."""
    if run.kind not in ("cat", "merge"):
        return []
    refs = []
    for item in run.config.get("adapters") or []:
        recorded = item.get("path") if isinstance(item, dict) else item
        name = item.get("name") if isinstance(item, dict) else None
        if not recorded:
            continue
        found = run.locate(str(recorded))
        if found is None and _looks_local(str(recorded)):
            raise AdapterError(
                f"run {run.path}: skill adapter {recorded} named in its run.json is gone (not there, nor "
                "beside the run); pass --adapters PATH,PATH... to point at the skills"
            )
        refs.append((name, str(found) if found is not None else str(recorded)))
    return refs


def _looks_local(text: str) -> bool:
    """A filesystem path rather than a hub id (``owner/name``)."""
    return text.startswith((".", "/", "~")) or text.count("/") != 1


def load_skills(refs: list[tuple[str | None, str]]) -> list[Any]:
    """Load the skill adapters; adapters of one folder name get distinct names (``adapter_1``)."""
    from lorasoup.adapters import load_adapter

    adapters = [load_adapter(path, name=name) for name, path in refs]
    names = [a.name for a in adapters]
    for i, adapter in enumerate(adapters):
        if names.count(adapter.name) > 1:
            adapter.name = f"{adapter.name}_{i}"
    return adapters


def ties_density(runs: list[Run]) -> float | None:
    """The density of the first TIES-family merge among ``runs`` (and their children), or the demo's."""
    for run in [c for r in runs for c in (r, *r.children)]:
        if run.kind == "merge" and run.config.get("method") in TIES_FAMILY:
            density = (run.config.get("parameters") or {}).get("density")
            if density is not None:
                return float(density)
        if run.kind == "demo":
            density = (run.json("results.json").get("settings") or {}).get("density")
            if density is not None:
                return float(density)
    return None
