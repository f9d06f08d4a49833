"""docs/demo.md's seed-0 table is the table `lorasoup demo` printed in a real default run.

What this guarantees: the table under the ``demo-default`` marker in docs/demo.md is, cell for cell,
the table rendered (with the CLI's own ``accuracy_cell``) from docs/results/demo-default/results.json,
the results.json of one real ``lorasoup demo`` run (seed 0, one seed); and that run used today's
default settings. What it does not: rerun the ~5-minute demo, so a code change that moves the numbers
(as DARE's mask did) is not caught here. The reduced-demo tests (tests/demo/test_demo.py:
``test_same_seed_same_numbers``) check that a run is deterministic; after a change that moves the
numbers, rerun ``lorasoup demo --output runs/demo`` and copy its results.json here.

The same holds for docs/real-model.md's SmolLM2 tables (GPU and CPU runs) and their results.json.
"""

import json
from dataclasses import asdict
from pathlib import Path

import pytest

from lorasoup.cli.render import DEMO_COLUMNS, accuracy_cell
from lorasoup.demo.settings import TASKS, DemoSettings

ROOT = Path(__file__).resolve().parents[2]
RESULTS = ROOT / "docs" / "results" / "demo-default" / "results.json"
MARKER = "<!-- demo-default:"


def documented_table(doc: str = "demo.md", marker: str = MARKER) -> list[str]:
    lines = (ROOT / "docs" / doc).read_text(encoding="utf-8").splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(marker)) + 1
    table = []
    for line in lines[start:]:
        if not line.startswith("|"):
            break
        table.append(line)
    return table


def rendered_table(results: dict, tasks: tuple[str, ...] | list[str] = TASKS) -> list[str]:
    header = ["method", *(DEMO_COLUMNS[t] for t in tasks)]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in results["table"]:
        cells = [row["method"], *(accuracy_cell(row[t], len(results["seeds"]) > 1) for t in tasks)]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def test_documented_seed0_table_is_the_committed_runs_table():
    results = json.loads(RESULTS.read_text(encoding="utf-8"))
    assert results["seeds"] == [0] and results["model"] == "tiny"
    assert documented_table() == rendered_table(results)


def test_the_committed_run_used_todays_default_settings():
    results = json.loads(RESULTS.read_text(encoding="utf-8"))
    settings = json.loads(json.dumps(asdict(DemoSettings())))
    assert results["settings"] == settings


@pytest.mark.parametrize(
    ("marker", "run"),
    [
        ("<!-- smollm2-gpu-3seeds:", "demo-smollm2-gpu-h100-3seeds"),
        ("<!-- smollm2-gpu:", "demo-smollm2-gpu-h100-procedural"),
        ("<!-- smollm2-cpu:", "demo-smollm2-cpu-procedural"),
    ],
)
def test_real_model_tables_are_the_committed_runs(marker: str, run: str):
    """docs/real-model.md's tables, row for row, are those runs' results.json (bold dropped; the
    header may say more, e.g. how many GSM-Hard problems)."""
    results = json.loads((ROOT / "docs" / "results" / run / "results.json").read_text(encoding="utf-8"))
    documented = [line.replace("**", "") for line in documented_table("real-model.md", marker)]
    rendered = rendered_table(results, results["tasks"])
    header = [cell.strip() for cell in documented[0].split("|")[1:-1]]
    expected = ["method", *(DEMO_COLUMNS[t] for t in results["tasks"])]
    assert len(header) == len(expected)
    assert all(cell.startswith(name) for cell, name in zip(header, expected, strict=True))
    assert documented[2:] == rendered[2:]


def test_real_model_failure_modes_are_what_bench_verdicts_prints() -> None:
    """docs/real-model.md's failure-mode table is bench/verdicts.py's output over the committed
    per-example archives of the three H100 seeds."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("verdicts", ROOT / "bench" / "verdicts.py")
    verdicts = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(verdicts)
    runs = ROOT / "docs" / "results"
    results = json.loads((runs / "demo-smollm2-gpu-h100-3seeds" / "results.json").read_text(encoding="utf-8"))
    archives = [
        runs / f"demo-smollm2-gpu-h100-procedural{suffix}" / "per-example.tar.xz"
        for suffix in ("", "-seed1", "-seed2")
    ]
    printed = verdicts.verdict_table(results, archives)
    assert len(printed) == 2 + len(results["table"])  # every row has its 600 answers
    assert documented_table("real-model.md", "<!-- smollm2-gpu-verdicts:") == printed
