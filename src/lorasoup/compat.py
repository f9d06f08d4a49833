"""Can these adapters be composed? A report computed before any work is done."""

from __future__ import annotations

from dataclasses import dataclass, field

from lorasoup.adapters import LoraAdapter
from lorasoup.errors import CompatibilityError


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
    adapters: list[LoraAdapter], *, allow_base_mismatch: bool = False
) -> CompatibilityReport:
    """Compare adapters module by module.

    Never raises: see :meth:`CompatibilityReport.raise_if_incompatible`.
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

    bases = {a.name: a.base_model for a in adapters if a.base_model}
    if len(set(bases.values())) > 1 and not allow_base_mismatch:
        listing = ", ".join(f"{n}: {b!r}" for n, b in bases.items())
        report.problems.append(
            f"adapters were trained on different base models ({listing}); "
            "if these name the same model, pass --allow-base-mismatch"
        )
    if len({a.fan_in_fan_out for a in adapters}) > 1:
        report.problems.append("adapters disagree on fan_in_fan_out, so they target different model families")

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
                break

    for adapter in adapters:
        gap = missing[adapter.name]
        if gap:
            report.notices.append(
                f"{adapter.name} does not adapt {len(gap)} of {len(union)} modules (e.g. {gap[0]}); "
                "its weight there is a zero block"
            )
    return report
