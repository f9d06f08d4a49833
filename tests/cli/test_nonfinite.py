"""Issue 20 (1): an adapter with NaN / inf factors is refused at load by every command: one line, exit
code 2, nothing written."""

import json

import pytest
import yaml
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from lorasoup.adapters import load_adapter
from lorasoup.cli import app
from lorasoup.errors import AdapterError

runner = CliRunner()


def poison(adapter_dir, value=float("nan")):
    """Write one non-finite entry into the adapter's first lora_B weight, as a corrupt file would hold."""
    path = adapter_dir / "adapter_model.safetensors"
    weights = load_file(str(path))
    key = sorted(k for k in weights if "lora_B" in k)[0]
    weights[key] = weights[key].clone()
    weights[key][0, 0] = value
    save_file(weights, str(path))
    return adapter_dir


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_load_adapter_refuses_non_finite_factors(make_lora, value):
    bad = poison(make_lora("bad"), value)
    with pytest.raises(AdapterError, match=r"non-finite value.*lora_B"):
        load_adapter(bad)


@pytest.fixture
def setup(make_lora, llama_dir, tmp_path):
    good, bad = make_lora("good", seed=1), poison(make_lora("bad", seed=2))
    data = tmp_path / "mix.json"
    data.write_text(json.dumps([{"instruction": f"add {a} 1", "output": str(a + 1)} for a in range(8)]))
    config = {
        "base_model": str(llama_dir),
        "adapters": [{"path": str(good), "name": "good"}, {"path": str(bad), "name": "bad"}],
        "data": {"train": [str(data)], "template": "plain", "cutoff_len": 32},
        "output": str(tmp_path / "out"),
        "train": {"learning_rate": 0.05, "max_steps": 2, "batch_size": 4},
    }
    (tmp_path / "cat.yaml").write_text(yaml.safe_dump(config))
    (tmp_path / "moe.yaml").write_text(yaml.safe_dump(config))
    task = {"name": "t", "data": [str(data)], "prompt": "{instruction}", "reference": "output"}
    task |= {"extractor": "strip", "metric": "exact_match"}
    (tmp_path / "task.yaml").write_text(yaml.safe_dump(task))
    return good, bad, tmp_path


COMMANDS = {
    "inspect": lambda good, bad, tmp: ["inspect", str(good), str(bad)],
    "merge": lambda good, bad, tmp: [
        "merge",
        "--method",
        "linear",
        "-a",
        str(good),
        "-a",
        str(bad),
        "--output",
        str(tmp / "out"),
    ],
    "compress": lambda good, bad, tmp: ["compress", str(bad), "--rank", "2", "--output", str(tmp / "out")],
    "cat": lambda good, bad, tmp: ["cat", str(tmp / "cat.yaml")],
    "moe": lambda good, bad, tmp: ["moe", str(tmp / "moe.yaml")],
    "eval": lambda good, bad, tmp: [
        *("eval", "--model", yaml.safe_load((tmp / "cat.yaml").read_text())["base_model"]),
        *("--adapter", str(bad), "--task", str(tmp / "task.yaml"), "--output", str(tmp / "out")),
        *("--max-new-tokens", "2", "--limit", "2"),
    ],
}


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_every_command_refuses_a_non_finite_adapter(setup, command):
    good, bad, tmp = setup
    result = runner.invoke(app, COMMANDS[command](good, bad, tmp))
    assert result.exit_code == 2, result.output
    assert "non-finite value" in result.output and len(result.output.strip().splitlines()) == 1, result.output
    assert not (tmp / "out").exists() and not list(tmp.glob(".out*")) and not list(tmp.glob("out.*"))
