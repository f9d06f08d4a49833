"""The import rules of docs/architecture.md, read from the source with ``ast`` (nothing is imported).

Every ``import`` counts, at module level or inside a function, except those under ``if TYPE_CHECKING:``.
"""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"

LAYERS: dict[str, int] = {
    "errors": 0,
    **dict.fromkeys(["registry", "config", "devices", "artifacts", "resources", "models", "adapters"], 1),
    **dict.fromkeys(["compat", "lowrank", "sites", "options", "training", "export"], 2),
    **dict.fromkeys(["cat", "merging", "evaluation"], 3),
    **dict.fromkeys(["search", "moe", "diagnostics"], 4),
    "report": 5,
    "demo": 6,
    **dict.fromkeys(["cli", "__main__"], 7),
}
"""Each top-level module or package of ``lorasoup`` and its layer: a layer imports only its own and lower
ones. The package root (``lorasoup/__init__.py``, the lazy public API) is left out."""


def _modules() -> dict[str, Path]:
    found = {}
    for path in sorted((SRC / "lorasoup").rglob("*.py")):
        parts = list(path.relative_to(SRC).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        found[".".join(parts)] = path
    return found


MODULES = _modules()


def _type_checking_nodes(tree: ast.AST) -> set[int]:
    skipped: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skipped.update(id(child) for stmt in node.body for child in ast.walk(stmt))
    return skipped


def _imports(module: str, path: Path) -> list[tuple[str, str | None]]:
    """``(imported module, imported name or None)`` for every lorasoup import of ``module``."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    skipped = _type_checking_nodes(tree)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: list[tuple[str, str | None]] = []
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.Import):
            found += [(alias.name, None) for alias in node.names if alias.name.startswith("lorasoup")]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if not target.startswith("lorasoup"):
                continue
            for alias in node.names:
                submodule = f"{target}.{alias.name}"
                found.append((submodule, None) if submodule in MODULES else (target, alias.name))
    return found


IMPORTS = {module: _imports(module, path) for module, path in MODULES.items()}


def _top(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def test_every_top_level_module_has_a_layer() -> None:
    tops = {_top(m) for m in MODULES} - {""}
    assert tops <= set(LAYERS), f"give these a layer in LAYERS: {sorted(tops - set(LAYERS))}"


def test_layers_import_only_downwards() -> None:
    upward = [
        f"{module} imports {target} (layer {LAYERS[_top(target)]} > {LAYERS[_top(module)]})"
        for module, imports in IMPORTS.items()
        if _top(module)
        for target, _ in imports
        if _top(target) and LAYERS[_top(target)] > LAYERS[_top(module)]
    ]
    assert not upward, "\n".join(upward)


def test_only_the_cli_imports_the_demo() -> None:
    offenders = [
        f"{module} imports {target}"
        for module, imports in IMPORTS.items()
        if _top(module) not in ("demo", "cli", "__main__")
        for target, _ in imports
        if _top(target) == "demo"
    ]
    assert not offenders, "\n".join(offenders)


def test_no_private_names_across_packages() -> None:
    offenders = [
        f"{module} imports {name} from {target}"
        for module, imports in IMPORTS.items()
        for target, name in imports
        if name and name.startswith("_") and not name.startswith("__") and _top(target) != _top(module)
    ]
    assert not offenders, "\n".join(offenders)


def test_no_import_cycles() -> None:
    graph: dict[str, set[str]] = defaultdict(set)
    for module, imports in IMPORTS.items():
        graph[module].update(t for t, _ in imports if t in MODULES and t != module)
    cycles = _cycles(graph)
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan's algorithm, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph.get(child, ())))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return found


@pytest.mark.parametrize(
    "graph, expected",
    [
        ({"a": {"b"}, "b": {"a"}}, [["a", "b"]]),
        ({"a": {"b"}, "b": {"c"}, "c": set()}, []),
        ({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}, [["a", "b", "c"]]),
    ],
)
def test_the_cycle_finder_finds_cycles(graph: dict[str, set[str]], expected: list[list[str]]) -> None:
    assert _cycles(graph) == expected
