"""Can these adapters be composed? A report computed before any work is done."""

from __future__ import annotations

from dataclasses import dataclass, field

from lorasoup.adapters import LoraAdapter
from lorasoup.errors import CompatibilityError
from lorasoup.models import canonical_model_name

MISMATCH_HINT = "--set allow_base_mismatch=true (or allow_base_mismatch: true in the config)"
"""How a run command accepts differing base names; ``inspect`` passes its own flag."""


@dataclass
class CompatibilityReport:
    """What a set of adapters has in common and where they differ.

    ``problems`` make composition impossible (different base models or hidden sizes); ``notices`` are
    handled automatically (a module some adapters do not adapt gets a zero block for them).
    """

    adapters: list[LoraAdapter]
    modules: list[str]
    missing: dict[str, list[str]]
    problems: list[str] = field(default_factory=list)
    notices: list[str] = field(default_factory=list)

    @property
    def composable(self) -> bool:
        return not self.problems

    def raise_if_incompatible(self) -> None:
        if self.problems:
            more = f" (and {len(self.problems) - 1} more problems)" if len(self.problems) > 1 else ""
            raise CompatibilityError(self.problems[0] + more)


def module_shapes(adapter: LoraAdapter) -> dict[str, tuple[int, int]]:
    """``(out, in)`` of every module an adapter adapts."""
    return {path: (f.out_features, f.in_features) for path, f in adapter.modules.items()}


def check_compatibility(
    adapters: list[LoraAdapter],
    *,
    allow_base_mismatch: bool = False,
    base_model: str | None = None,
    mismatch_hint: str = MISMATCH_HINT,
) -> CompatibilityReport:
    """Compare adapters module by module, their declared bases by canonical name
    (``models.canonical_model_name``: an alias and the hub id it stands for are one base).

    ``base_model``: the base they will be composed onto; an adapter that declares another one gets a
    notice (its shapes may fit a model it was not trained on). ``mismatch_hint``: how the calling
    command accepts differing base names, shown only where the hidden sizes agree (where they differ
    no setting can help). Never raises: see :meth:`CompatibilityReport.raise_if_incompatible`.
    """
    union = sorted({path for a in adapters for path in a.modules})
    missing = {a.name: [p for p in union if p not in a.modules] for a in adapters}
    report = CompatibilityReport(adapters=adapters, modules=union, missing=missing)

    names = [a.name for a in adapters]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        report.problems.append(
            f"adapter names must be unique, {duplicates} repeat; give each a distinct name"
        )
    if len({a.fan_in_fan_out for a in adapters}) > 1:
        report.problems.append("adapters disagree on fan_in_fan_out, so they target different model families")
    shapes_differ = _check_shapes(adapters, report)
    _check_bases(adapters, report, allow_base_mismatch, base_model, None if shapes_differ else mismatch_hint)

    for adapter in adapters:
        gap = missing[adapter.name]
        if gap:
            report.notices.append(
                f"{adapter.name} does not adapt {len(gap)} of {len(union)} modules (e.g. {gap[0]}); "
                "its weight there is a zero block"
            )
    return report


def _check_shapes(adapters: list[LoraAdapter], report: CompatibilityReport) -> bool:
    """A problem for the first module whose shape differs between adapters; True if there was one."""
    seen: dict[str, tuple[str, tuple[int, int]]] = {}
    for adapter in adapters:
        for path, shape in module_shapes(adapter).items():
            first = seen.setdefault(path, (adapter.name, shape))
            if first[1] != shape:
                report.problems.append(
                    f"hidden sizes differ at {path}: {first[0]} is {first[1][0]}x{first[1][1]}, "
                    f"{adapter.name} is {shape[0]}x{shape[1]} (out x in); "
                    "the adapters belong to different models"
                )
                return True
    return False


def _check_bases(
    adapters: list[LoraAdapter],
    report: CompatibilityReport,
    allow_base_mismatch: bool,
    base_model: str | None,
    hint: str | None,
) -> None:
    bases = {a.name: canonical_model_name(a.base_model) for a in adapters if a.base_model}
    if len(set(bases.values())) > 1 and not allow_base_mismatch:
        listing = ", ".join(f"{n}: {b!r}" for n, b in bases.items())
        advice = f"; if these name the same model, pass {hint}" if hint else ""
        report.problems.append(f"adapters were trained on different base models ({listing}){advice}")
    used = canonical_model_name(base_model)
    if used is None:
        return
    for name, declared in bases.items():
        if declared != used:
            report.notices.append(
                f"{name} declares base model {declared!r} but is composed onto {used!r}; "
                "its shapes fit, but check it was trained on this model"
            )
