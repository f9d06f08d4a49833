"""docs/demo.md's seed-0 table is the table `lorasoup demo` printed in a real default run.

What this guarantees: the table under the ``demo-default`` marker in docs/demo.md is, cell for cell,
the table rendered (with the CLI's own ``accuracy_cell``) from docs/results/demo-default/results.json,
the results.json of one real ``lorasoup demo`` run (seed 0, one seed); and that run used today's
default settings. What it does not: rerun the ~5-minute demo, so a code change that moves the numbers
(as DARE's mask did) is not caught here. The reduced-demo tests (tests/demo/test_demo.py:
``test_same_seed_same_numbers``) check that a run is deterministic; after a change that moves the
numbers, rerun ``lorasoup demo --output runs/demo`` and copy its results.json here.
"""

import json
from dataclasses import asdict
from pathlib import Path

from lorasoup.cli.render import DEMO_COLUMNS, accuracy_cell
from lorasoup.demo.settings import TASKS, DemoSettings

ROOT = Path(__file__).resolve().parents[2]
RESULTS = ROOT / "docs" / "results" / "demo-default" / "results.json"
MARKER = "<!-- demo-default:"


def documented_table() -> list[str]:
    lines = (ROOT / "docs" / "demo.md").read_text(encoding="utf-8").splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(MARKER)) + 1
    table = []
    for line in lines[start:]:
        if not line.startswith("|"):
            break
        table.append(line)
    return table


def rendered_table(results: dict) -> list[str]:
    header = ["method", *(DEMO_COLUMNS[t] for t in TASKS)]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in results["table"]:
        cells = [row["method"], *(accuracy_cell(row[t], False) for t in TASKS)]
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
