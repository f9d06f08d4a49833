"""CAT under data parallelism: two processes (torchrun, gloo on the CPU) learn the same weights as one
process with the same global batch."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from lorasoup.cli import app
from tests.conftest import torchrun

# Rows of one token length: a per-process mean over tokens, averaged over processes, is then exactly
# the mean over the whole batch (the quantity one process minimises).
RECORDS = [
    {"instruction": f"what is {a} plus {b} ?", "output": str(a + b)} for a in range(1, 5) for b in range(1, 5)
]


def test_two_processes_learn_the_weights_of_one(make_lora, llama_dir: Path, tmp_path: Path) -> None:
    from lorasoup.training.data import build_dataset
    from tests.conftest import build_tokenizer

    lengths = {
        len(row["input_ids"]) for row in build_dataset(RECORDS * 2, build_tokenizer(), template="plain")
    }
    assert len(lengths) == 1, "the test needs rows of one length"
    data = tmp_path / "data.json"
    data.write_text(json.dumps(RECORDS * 2))  # 32 rows: 4 steps of 8 per epoch
    config = {
        "base_model": str(llama_dir),
        "adapters": [str(make_lora("a", seed=1)), str(make_lora("b", r=2, seed=2))],
        "data": {"train": [str(data)], "template": "plain", "cutoff_len": 32},
        "output": str(tmp_path / "one"),
        "train": {"learning_rate": 0.05, "epochs": 2, "batch_size": 8, "warmup": 0.25, "device": "cpu"},
    }
    path = tmp_path / "cat.yaml"
    path.write_text(yaml.safe_dump(config))
    assert CliRunner().invoke(app, ["cat", str(path)]).exit_code == 0

    torchrun(
        "-m", "lorasoup", "cat", str(path), "--output", str(tmp_path / "two"), "--set", "train.batch_size=4"
    )

    one = json.loads((tmp_path / "one" / "cat_weights.json").read_text())["weights"]
    two = json.loads((tmp_path / "two" / "cat_weights.json").read_text())["weights"]
    initial = json.loads((tmp_path / "one" / "cat_weights.json").read_text())["initial_weights"]
    moved = max(abs(one[g][a] - initial[g][a]) for g in one for a in one[g])
    assert moved > 1e-3  # the weights did train
    assert max(abs(one[g][a] - two[g][a]) for g in one for a in one[g]) == pytest.approx(0.0, abs=1e-5)
    runs = [json.loads((tmp_path / name / "run.json").read_text()) for name in ("one", "two")]
    assert [run["training"]["steps"] for run in runs] == [8, 8]
    assert [run["resources"]["num_processes"] for run in runs] == [1, 2]
    assert all(run["resources"]["peak_gpu_memory_gib"] is None for run in runs)  # CPU: nothing measured
    assert all(run["training"]["throughput"]["steady_steps_per_s"] > 0 for run in runs)
