"""bench/skill_steps.py: the study's skill LoRA trained at each step count and scored on its own task,
on a tiny Llama from a benchmark file, as the GPU sweep runs it (issue 18's precondition)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from lorasoup.config import load_config
from lorasoup.demo.benchmark import Benchmark
from lorasoup.demo.benchmark_file import write_benchmarks
from lorasoup.demo.real_study import RealDemoSettings, built_with

BENCH = Path(__file__).parents[2] / "bench"
_SPEC = importlib.util.spec_from_file_location("skill_steps", BENCH / "skill_steps.py")
skill_steps = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(skill_steps)


def record(a: int, b: int) -> dict:
    return {"instruction": f"{a} + {b}", "output": f"{a} + {b} = {a + b}", "value": a + b}


def test_the_sweep_trains_and_scores_each_step_count(
    tmp_path: Path, llama_dir: Path, tokenizer, monkeypatch, capsys
):
    monkeypatch.delenv("OUT", raising=False)
    sets = ["template=plain", "cutoff_len=32", "math_tokens=4", "batch_size=4", "eval_batch_size=4",
            "device=cpu", "sizes.skill=12", "sizes.test=3"]  # fmt: skip

    settings = load_config(RealDemoSettings, None, sets)
    train = [record(a, 1) for a in range(12)]
    benchmark = Benchmark(
        base=[], train={"math": train, "code": train, "composite": train},
        test={"math": [record(a, 2) for a in range(3)], "code": [], "composite": []},
    )  # fmt: skip
    data = write_benchmarks(tmp_path / "bench.json.gz", {5: benchmark}, built_with(settings, tokenizer))
    out = tmp_path / "result.json"
    argv = ["--model", str(llama_dir), "--seed", "5", "--steps", "1", "3", "--work", str(tmp_path / "work"),
            "--out", str(out), *[a for s in sets for a in ("--set", s)],
            "--set", f"benchmark_file={data}"]  # fmt: skip
    assert skill_steps.main(argv) == 0
    result = json.loads(out.read_text())
    printed = [line for line in capsys.readouterr().out.splitlines() if "LoRA, " in line]
    assert [line.split(": ")[1].split(" %")[0] for line in printed] == [
        f"{100 * row['accuracy']:.1f}" for row in result["rows"]
    ]  # the fraction printed as a percent
    counts = (result["skill"], result["seed"], result["train_records"], result["test_examples"])
    assert counts == ("math", 5, 12, 3)
    assert result["settings"]["benchmark_file"] == str(data) and result["settings"]["device"] == "cpu"
    assert result["env"]["device"] == "cpu"
    assert result["base_model"]["num_parameters"] > 0  # converted once, through the study's own path
    assert [row["steps"] for row in result["rows"]] == [1, 3]
    assert [row["epochs"] for row in result["rows"]] == [pytest.approx(4 / 12, abs=1e-3), 1.0]
    assert all(0 <= row["accuracy"] <= 1 and row["train_s"] > 0 for row in result["rows"])
    assert all(row["last_loss"] > 0 for row in result["rows"])  # from each LoRA's run.json
    assert result["rows"][-1]["step_s_median"] > 0  # its steps past the first (none after 1 step)
    assert all(
        row["scoring"]["generate_s"] > 0 and row["scoring"]["backend"] == "hf" for row in result["rows"]
    )
    work = tmp_path / "work" / "seed-5"
    for steps in (1, 3):  # each count's own LoRA, trained for that many steps
        training = json.loads((work / f"math-{steps}-steps" / "run.json").read_text())["training"]
        assert training["steps"] == steps
        scored = (work / "eval" / f"math-lora-{steps}-steps" / "math.jsonl").read_text().splitlines()
        assert len(scored) == 3


def test_the_sweep_needs_the_benchmark_file(tmp_path: Path, llama_dir: Path, capsys) -> None:
    argv = ["--model", str(llama_dir), "--steps", "1", "--work", str(tmp_path)]
    argv += ["--out", str(tmp_path / "r.json")]
    assert skill_steps.main(argv) == 2
    assert "benchmark_file" in capsys.readouterr().err and not (tmp_path / "r.json").exists()
