"""``lorasoup merge`` / ``compress`` end to end: the artifacts load in stock PEFT with the intended ΔW."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from peft import PeftModel
from transformers import AutoModelForCausalLM
from typer.testing import CliRunner

from lorasoup.adapters import load_adapter
from lorasoup.cli import app
from lorasoup.export.peft import merge_factors_into
from lorasoup.merging import MERGE_METHODS, MergeParams
from lorasoup.merging.layer_swap import LayerSwapRule, module_swap_weights
from lorasoup.merging.run import merge_adapters

runner = CliRunner()
INPUT = torch.tensor([[1, 5, 9, 14, 20, 33, 41, 7]])


@pytest.fixture
def two_adapters(make_lora) -> tuple[Path, Path]:
    math = make_lora("math", r=4, alpha=8, seed=1)
    # Another rank, rsLoRA, and fewer target modules: zero-filled where absent.
    code = make_lora("code", r=2, alpha=4, seed=2, use_rslora=True, targets=["q_proj", "v_proj"])
    return math, code


def _logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(INPUT).logits


def _params(name: str) -> dict:
    method = MERGE_METHODS.get(name)
    params: dict = {"density": 0.5} if method.uses_density else {}
    if method.space == "delta" and name != "linear":
        params["rank"] = 4
    return params


def _run(tmp_path: Path, config: dict, *args: str):
    path = tmp_path / "merge.yaml"
    path.write_text(yaml.safe_dump(config))
    return runner.invoke(app, ["merge", str(path), *args])


@pytest.mark.parametrize("name", list(MERGE_METHODS))
def test_every_method_exports_an_adapter_stock_peft_reproduces(
    name: str, llama_dir: Path, two_adapters, make_lora, tmp_path: Path
) -> None:
    paths = two_adapters
    if MERGE_METHODS.get(name).space == "factor":  # PEFT's rule: one rank
        paths = (paths[0], make_lora("code4", r=4, alpha=4, seed=2))
    config = {
        "method": name,
        "base_model": str(llama_dir),
        "adapters": [{"path": str(paths[0]), "weight": 0.7}, {"path": str(paths[1]), "weight": -0.4}],
        "parameters": _params(name),
        "output": str(tmp_path / "out"),
        "seed": 3,
    }
    rows = None
    if MERGE_METHODS.get(name).space == "layer":  # layer swap: the first layer from math, the rest code
        config["layer_swap"] = {"first": 1, "edges": "math", "rest": "code"}
    result = _run(tmp_path, config)
    assert result.exit_code == 0, result.output
    out = tmp_path / "out"
    assert {"adapter_config.json", "adapter_model.safetensors", "run.json", "merge_report.json"} <= {
        p.name for p in out.iterdir()
    }
    peft_logits = _logits(PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(llama_dir), out))

    adapters = [load_adapter(p) for p in paths]
    modules = sorted({m for a in adapters for m in a.modules})
    if "layer_swap" in config:
        rows = module_swap_weights(
            LayerSwapRule(first=1, edges="math", rest="code"), ["math", "code"], modules
        )
    intended, _ = merge_adapters(
        adapters,
        [0.7, -0.4],
        MERGE_METHODS.get(name),
        MergeParams(**_params(name)),
        modules=modules,
        seed=3,
        device="cpu",
        module_weights=rows,
    )
    expected = _logits(merge_factors_into(AutoModelForCausalLM.from_pretrained(llama_dir), intended))
    assert torch.allclose(peft_logits, expected, atol=1e-5), (peft_logits - expected).abs().max()
    assert json.loads((out / "run.json").read_text())["method"]["name"] == name


def test_linear_is_exactly_the_weighted_sum_of_the_inputs(
    llama_dir: Path, two_adapters, tmp_path: Path
) -> None:
    config = {
        "method": "linear",
        "adapters": [
            {"path": str(two_adapters[0]), "weight": 1.5},
            {"path": str(two_adapters[1]), "weight": -1},
        ],
        "output": str(tmp_path / "out"),
    }
    assert _run(tmp_path, config).exit_code == 0
    merged = load_adapter(tmp_path / "out")
    inputs = [load_adapter(p) for p in two_adapters]
    for path, factors in merged.modules.items():
        expected = sum(
            w * a.modules[path].delta() for w, a in zip([1.5, -1.0], inputs, strict=True) if path in a.modules
        )
        assert torch.allclose(factors.delta(), expected, atol=1e-6), path
    assert merged.peft_config["r"] == 6  # 4 + 2, every module padded to one rank


def test_merge_flag_writes_weights_equal_to_the_adapter(
    llama_dir: Path, two_adapters, tmp_path: Path
) -> None:
    args = [
        "merge",
        "-a",
        f"{two_adapters[0]}:0.5",
        "-a",
        str(two_adapters[1]),
        "--method",
        "svd",
        "--rank",
        "3",
    ]
    args += ["--base-model", str(llama_dir), "--merge", "--output", str(tmp_path / "out")]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    merged = _logits(AutoModelForCausalLM.from_pretrained(tmp_path / "out" / "merged"))
    adapter = _logits(
        PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(llama_dir), tmp_path / "out")
    )
    assert torch.allclose(merged, adapter, atol=1e-5)
    report = json.loads((tmp_path / "out" / "merge_report.json").read_text())
    assert report["rank"] == 3 and 0 < report["max_discarded_energy"] < 1


def test_compress_matches_dense_truncation(llama_dir: Path, make_lora, tmp_path: Path) -> None:
    source = make_lora("wide", r=8, alpha=16, seed=5)
    result = runner.invoke(app, ["compress", str(source), "--rank", "3", "--output", str(tmp_path / "small")])
    assert result.exit_code == 0, result.output
    small, wide = load_adapter(tmp_path / "small"), load_adapter(source)
    assert small.peft_config["r"] == 3
    for path, factors in wide.modules.items():
        U, S, Vh = torch.linalg.svd(factors.delta().double(), full_matrices=False)
        best = (U[:, :3] * S[:3]) @ Vh[:3]
        assert torch.allclose(small.modules[path].delta().double(), best, atol=1e-5), path


@pytest.mark.parametrize(
    ("method", "params", "message"),
    [
        ("tis", {}, "did you mean 'ties'"),
        ("ties", {}, "parameters.density: method ties needs"),
        ("linear", {"density": 0.5}, "does not use it"),
        ("ties", {"density": 1.5}, "parameters.density must be in (0, 1]"),
        ("linear_factor", {"rank": 2}, "keeps the adapters' rank"),
    ],
)
def test_bad_configs_fail_in_one_line_and_write_nothing(
    method: str, params: dict, message: str, two_adapters, tmp_path: Path
) -> None:
    config = {"method": method, "adapters": [str(p) for p in two_adapters], "parameters": params}
    config["output"] = str(tmp_path / "out")
    result = _run(tmp_path, config)
    assert result.exit_code == 2
    assert message in result.output and "Traceback" not in result.output
    assert not (tmp_path / "out").exists()


def test_factor_space_with_mixed_ranks_is_a_clear_error(two_adapters, tmp_path: Path) -> None:
    config = {
        "method": "ties_factor",
        "adapters": [str(p) for p in two_adapters],
        "output": str(tmp_path / "o"),
    }
    config["parameters"] = {"density": 0.5}
    result = _run(tmp_path, config)
    assert result.exit_code == 2 and "use the exact ΔW-space method 'ties'" in result.output
    assert not (tmp_path / "o").exists()
