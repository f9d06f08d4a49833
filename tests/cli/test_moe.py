"""`lorasoup moe CONFIG` and `lorasoup moe distill`: complete artifacts, one-line errors, shipped config."""

import json
from pathlib import Path

import pytest
import torch
import yaml
from typer.testing import CliRunner

from lorasoup.cli import app
from lorasoup.config import load_config
from lorasoup.errors import ConfigError
from lorasoup.moe.config import MoeRunConfig

runner = CliRunner()
EXAMPLE = Path(__file__).parents[2] / "configs" / "moe-example.yaml"


def write_config(tmp_path, llama_dir, adapter_dirs, data_file, **router):
    config = {
        "base_model": str(llama_dir),
        "adapters": [{"path": str(path), "name": name} for name, path in adapter_dirs.items()],
        "data": {"train": [str(data_file)], "template": "plain", "cutoff_len": 64},
        "output": str(tmp_path / "moe"),
        "router": router,
        "train": {"learning_rate": 0.05, "max_steps": 3, "batch_size": 8},
    }
    path = tmp_path / "moe.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_shipped_moe_config_loads():
    config = load_config(MoeRunConfig, EXAMPLE)
    assert config.adapters and config.data.train
    assert config.router.granularity in ("module", "layer") and config.train.learning_rate == 0.001


def test_train_then_distill_write_complete_artifacts(tmp_path, llama_dir, adapter_dirs, data_file):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    config = write_config(tmp_path, llama_dir, adapter_dirs, data_file, granularity="layer")
    result = runner.invoke(app, ["moe", str(config), "--set", "train.seed=2"])
    assert result.exit_code == 0, result.output
    out = tmp_path / "moe"
    assert {p.name for p in out.iterdir()} == {
        "moe_config.json",
        "router.safetensors",
        "adapters",
        "run.json",
    }
    record = json.loads((out / "run.json").read_text())
    assert record["command"] == "moe" and record["seed"] == 2
    assert len(record["training"]["balance_losses"]) == 3

    distilled = tmp_path / "distilled"
    result = runner.invoke(app, ["moe", "distill", str(out), "--output", str(distilled), "--batch-size", "4"])
    assert result.exit_code == 0, result.output
    assert {"adapter_config.json", "adapter_model.safetensors", "cat_weights.json", "run.json"} <= {
        p.name for p in distilled.iterdir()
    }
    table = json.loads((distilled / "cat_weights.json").read_text())
    assert table["adapters"] == ["math", "code"] and len(table["weights"]) == 10
    for row in table["weights"].values():  # soft gates sum to 1 per token, so do their means
        assert sum(row.values()) == pytest.approx(1.0, abs=1e-5)
    peft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(llama_dir), distilled)
    with torch.no_grad():
        assert torch.isfinite(peft(torch.tensor([[1, 5, 9]])).logits).all()
    assert json.loads((distilled / "run.json").read_text())["distillation"]["tokens"] > 0


@pytest.mark.parametrize(
    ("router", "message"),
    [
        ({"topk": 1}, "unknown key 'router.topk'; did you mean 'top_k'?"),
        ({"top_k": 3}, "router.top_k=3 exceeds the number of adapters (2)"),
        ({"top_k": 1, "renormalize": True}, "router.renormalize with top_k=1"),
        ({"granularity": "block"}, "router.granularity: 'block' is not allowed"),
        ({"balance_coef": -1}, "router.balance_coef must be >= 0"),
    ],
)
def test_bad_configs_fail_in_one_line(tmp_path, llama_dir, adapter_dirs, data_file, router, message):
    config = write_config(tmp_path, llama_dir, adapter_dirs, data_file, **router)
    with pytest.raises(ConfigError) as error:
        load_config(MoeRunConfig, config)
    assert message in str(error.value) and "\n" not in str(error.value)
    result = runner.invoke(app, ["moe", "train", str(config)])
    assert result.exit_code == 2 and "error:" in result.output
    assert not (tmp_path / "moe").exists()


def test_distill_of_something_else_fails_in_one_line(tmp_path):
    result = runner.invoke(app, ["moe", "distill", str(tmp_path), "--output", str(tmp_path / "x")])
    assert result.exit_code == 2 and "no moe_config.json" in result.output


def test_distill_takes_set_checked_before_any_work(tmp_path):
    args = ["moe", "distill", str(tmp_path), "--output", str(tmp_path / "x")]
    result = runner.invoke(app, [*args, "--set", "batch_size=0"])
    assert result.exit_code == 2 and "batch_size must be at least 1" in result.output
    result = runner.invoke(app, [*args, "--set", "export_dtype=float8"])
    assert result.exit_code == 2 and "export_dtype: 'float8' is not allowed" in result.output
    result = runner.invoke(app, [*args, "--set", "batch_size=0", "--batch-size", "2"])  # the flag wins
    assert result.exit_code == 2 and "no moe_config.json" in result.output


def test_flow_trains_lora_flow_gates_then_distills_to_a_stock_peft_adapter(
    tmp_path, llama_dir, adapter_dirs, data_file
):
    """`lorasoup moe train --flow` (LoRA-Flow: soft per-layer gates, no balancing loss) on k target
    examples, then `moe distill`: one weight row per layer, and stock PEFT reloads the adapter."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    config = write_config(tmp_path, llama_dir, adapter_dirs, data_file)
    result = runner.invoke(app, ["moe", "train", str(config), "--flow", "--set", "data.max_examples=16"])
    assert result.exit_code == 0, result.output
    out = tmp_path / "moe"
    record = json.loads((out / "run.json").read_text())
    assert record["config"]["router"]["preset"] == "lora_flow"
    assert record["config"]["router"]["granularity"] == "layer"
    assert (
        set(record["training"]["balance_losses"]) != set() and record["config"]["router"]["balance_coef"] == 0
    )
    assert json.loads((out / "moe_config.json").read_text())["router"]["granularity"] == "layer"

    distilled = tmp_path / "flow-cat"
    result = runner.invoke(app, ["moe", "distill", str(out), "--output", str(distilled)])
    assert result.exit_code == 0, result.output
    weights = json.loads((distilled / "cat_weights.json").read_text())["weights"]
    by_layer: dict[str, set] = {}
    for path, row in weights.items():  # one gate per layer: all its modules share the mean gate
        by_layer.setdefault(path.split(".self_attn")[0].split(".mlp")[0], set()).add(tuple(row.values()))
    assert all(len(rows) == 1 for rows in by_layer.values())
    peft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(llama_dir), distilled)
    with torch.no_grad():
        assert torch.isfinite(peft(torch.tensor([[1, 5, 9]])).logits).all()


def test_flow_preset_refuses_hard_or_balanced_gates(tmp_path, llama_dir, adapter_dirs, data_file):
    config = write_config(tmp_path, llama_dir, adapter_dirs, data_file, top_k=1)
    result = runner.invoke(app, ["moe", "train", str(config), "--flow"])
    assert result.exit_code == 2 and "router.preset lora_flow" in result.output
