"""The printers: one weights table for CAT, search and distilled MoE weights; plain text when piped."""

import io

import torch
from rich.console import Console

from lorasoup.cli.render import accuracy_cell, print_merge_result, weights_table


def rendered(renderable) -> str:
    console = Console(record=True, width=100, file=io.StringIO())
    console.print(renderable)
    return console.export_text()


def test_weights_table_gives_mean_min_max_over_groups_per_adapter():
    weights = torch.tensor([[0.25, 1.0], [0.75, 2.0], [0.5, 3.0]])  # (G=3 groups, K=2 adapters)
    text = rendered(weights_table("CAT weights (mean over groups)", ["math", "code"], weights))
    rows = {line.split()[1]: line.split()[3:8:2] for line in text.splitlines() if line.split()[1:2]}
    assert "CAT weights (mean over groups)" in text
    assert rows["math"] == ["0.500", "0.250", "0.750"]
    assert rows["code"] == ["2.000", "1.000", "3.000"]


def test_accuracy_cells():
    assert accuracy_cell({"mean": 0.125, "std": 0.01}, several=False) == "12.5"
    assert accuracy_cell({"mean": 0.125, "std": 0.012}, several=True) == "12.5 ± 1.2"
    assert accuracy_cell(None, several=True) == "–"


def test_merge_result_says_exact_or_the_largest_loss(tmp_path):
    from types import SimpleNamespace

    result = SimpleNamespace(
        notices=["b adapts fewer modules"],
        output=tmp_path,
        rank=4,
        modules={"a": 0, "b": 0},
        seconds=0.5,
        max_discarded_energy=None,
    )
    console = Console(record=True, width=200, file=io.StringIO())
    print_merge_result(console, result)
    result.max_discarded_energy = 0.0123
    print_merge_result(console, result)
    lines = console.export_text().splitlines()
    assert lines[0] == "notice: b adapts fewer modules"
    assert lines[1] == f"wrote {tmp_path} (PEFT adapter, rank 4, 2 modules, exact, 0.5 s)"
    assert "largest discarded energy 1.23% of a module's ‖ΔW‖²" in lines[3]
