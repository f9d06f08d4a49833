"""`lorasoup cat`: one library call, one-line errors, atomic artifacts."""

import json

import pytest
import torch
import yaml
from typer.testing import CliRunner

from lorasoup.adapters import load_adapter
from lorasoup.cli import app

runner = CliRunner()
RECORDS = [{"instruction": f"add {a} {b}", "output": str(a + b)} for a in range(5) for b in range(4)]


def write_config(tmp_path, llama_dir, adapters, data, **extra):
    config = {
        "base_model": str(llama_dir),
        "adapters": adapters,
        "data": {"train": [str(data)], "template": "plain", "cutoff_len": 64},
        "output": str(tmp_path / "out"),
        "train": {"learning_rate": 0.05, "max_steps": 4, "batch_size": 4, "save_steps": 2},
        **extra,
    }
    path = tmp_path / "cat.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.fixture
def data_file(tmp_path):
    path = tmp_path / "mix.json"
    path.write_text(json.dumps(RECORDS))
    return path


def test_cat_command_writes_a_complete_artifact(make_lora, llama_dir, tmp_path, data_file):
    a, b = make_lora("a", seed=1), make_lora("b", r=2, seed=2, targets=["q_proj", "v_proj"])
    config = write_config(tmp_path, llama_dir, [{"path": str(a), "name": "math"}, str(b)], data_file)
    result = runner.invoke(
        app, ["cat", str(config), "--set", "train.seed=3", "--merge", "--rank-bucket", "vllm"]
    )
    assert result.exit_code == 0, result.output
    out = tmp_path / "out"
    assert {p.name for p in out.iterdir()} >= {
        "adapter_config.json",
        "adapter_model.safetensors",
        "run.json",
        "cat_weights.json",
        "merged",
    }
    run = json.loads((out / "run.json").read_text())
    assert run["seed"] == 3 and run["config"]["train"]["seed"] == 3
    assert run["training"]["steps"] == 4 and len(run["training"]["losses"]) == 4
    assert run["weight_movement"]["theta_max_abs_change"] > 0
    assert run["versions"]["torch"] == torch.__version__
    from transformers import AutoModelForCausalLM  # the model's own parameters, not CAT's θ (issue 20)

    own = AutoModelForCausalLM.from_pretrained(llama_dir).num_parameters()
    assert run["base_model"]["num_parameters"] == own
    assert run["export"] == {"rank": 8, "concatenated_rank": 6, "merged": True, "recompression": None}
    weights = json.loads((out / "cat_weights.json").read_text())
    assert weights["adapters"] == ["math", "b"] and len(weights["weights"]) == 10
    exported = load_adapter(out)
    assert exported.peft_config["r"] == 8
    assert (tmp_path / "out.checkpoints" / "step-2" / "cat_state.pt").is_file()

    again = runner.invoke(app, ["cat", str(config)])
    assert again.exit_code == 2 and "already exists" in again.output


def test_cat_export_rank_is_the_exact_truncation_of_the_full_export(
    make_lora, llama_dir, tmp_path, data_file
):
    a, b = make_lora("a", seed=1), make_lora("b", r=2, seed=2)
    config = write_config(tmp_path, llama_dir, [str(a), str(b)], data_file)
    full = tmp_path / "full"
    assert runner.invoke(app, ["cat", str(config), "--output", str(full)]).exit_code == 0
    result = runner.invoke(app, ["cat", str(config), "--set", "export.rank=3"])
    assert result.exit_code == 0, result.output
    small, exact = load_adapter(tmp_path / "out"), load_adapter(full)
    assert small.peft_config["r"] == 3 and exact.peft_config["r"] == 6
    for path, factors in exact.modules.items():
        U, S, Vh = torch.linalg.svd(factors.delta().double(), full_matrices=False)
        best = (U[:, :3] * S[:3]) @ Vh[:3]
        assert torch.allclose(small.modules[path].delta().double(), best, atol=1e-5), path
    facts = json.loads((tmp_path / "out" / "run.json").read_text())["export"]["recompression"]
    assert set(facts) == set(exact.modules) and all(0 < f["discarded_energy"] < 1 for f in facts.values())
    assert "recompressed from the concatenated rank 6 to rank 3 (export.rank = 3)" in " ".join(
        result.output.split()
    )

    # issue 20: asking for more than ΣR exports the exact concatenation, says so, and re-extracts nothing
    result = runner.invoke(
        app, ["cat", str(config), "--set", "export.rank=32", "--output", str(tmp_path / "big")]
    )
    assert result.exit_code == 0, result.output
    assert "export.rank = 32 is at least the concatenated rank 6" in " ".join(result.output.split())
    run = json.loads((tmp_path / "big" / "run.json").read_text())
    assert run["export"]["recompression"] is None and load_adapter(tmp_path / "big").peft_config["r"] == 6
    for path, factors in exact.modules.items():
        assert torch.allclose(
            load_adapter(tmp_path / "big").modules[path].delta(), factors.delta(), atol=1e-6
        )


def bad_input_cases(tmp_path, a, data_file):
    empty = tmp_path / "empty.json"
    empty.write_text("[]")
    missing_field = tmp_path / "missing.json"
    missing_field.write_text(json.dumps([{"instruction": "x"}]))
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        (corrupt / name).write_bytes((a / name).read_bytes())
    (corrupt / "adapter_model.safetensors").write_bytes(b"not a safetensors file")
    no_config = tmp_path / "noconfig"
    no_config.mkdir()
    return {
        "empty dataset": ([str(a)], empty, "no records"),
        "missing field": ([str(a)], missing_field, "output"),
        "corrupt safetensors": ([str(corrupt)], data_file, "corrupt"),
        "missing config": ([str(no_config)], data_file, "adapter_config.json"),
    }


def test_bad_inputs_give_one_line_and_no_artifact(make_lora, llama_dir, tmp_path, data_file):
    a = make_lora("a")
    for label, (adapters, data, expected) in bad_input_cases(tmp_path, a, data_file).items():
        config = write_config(tmp_path, llama_dir, adapters, data)
        result = runner.invoke(app, ["cat", str(config)])
        assert result.exit_code == 2, (label, result.output)
        assert expected in result.output, (label, result.output)
        assert "Traceback" not in result.output
        assert not (tmp_path / "out").exists(), label
        assert not list(tmp_path.glob(".out.tmp-*")), label


def test_config_errors_name_the_field(make_lora, llama_dir, tmp_path, data_file):
    config = write_config(tmp_path, llama_dir, [str(make_lora("a"))], data_file)
    result = runner.invoke(app, ["cat", str(config), "--set", "train.learning_rte=0.1"])
    assert (
        result.exit_code == 2 and "train.learning_rte" in result.output and "learning_rate" in result.output
    )
    result = runner.invoke(app, ["cat", str(config), "--set", "cat.granularity=row"])
    assert result.exit_code == 2 and "'module'" in result.output


def test_shape_mismatch_with_base_model(make_lora, gpt2_dir, tmp_path, data_file):
    config = write_config(tmp_path, gpt2_dir, [str(make_lora("a"))], data_file)
    result = runner.invoke(app, ["cat", str(config)])
    assert result.exit_code == 2 and "another model" in result.output
    assert not (tmp_path / "out").exists()
