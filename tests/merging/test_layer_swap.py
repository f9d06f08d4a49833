"""Layer swapping is CAT with one-hot per-layer weights: same logits, and stock PEFT reloads its export."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from peft import PeftModel
from transformers import AutoModelForCausalLM
from typer.testing import CliRunner

from lorasoup.adapters import load_adapter
from lorasoup.cat.fold import fold_composition
from lorasoup.cat.inject import compose_cat
from lorasoup.cli import app
from lorasoup.errors import ConfigError
from lorasoup.export.peft import save_peft_adapter
from lorasoup.merging.layer_swap import (
    LayerSwapRule,
    compose_layer_swap,
    count_layers,
    layer_index,
    layer_swap_factors,
    module_swap_weights,
    swap_weights,
)

IDS = torch.tensor([[1, 5, 9, 14, 20, 33, 41, 7]])


@pytest.fixture
def adapters(make_lora):
    math = load_adapter(make_lora("math", r=4, seed=1), name="math")
    # another rank, rsLoRA, fewer modules: where code is chosen, its unadapted modules get nothing
    code = load_adapter(
        make_lora("code", r=2, seed=2, targets=["q_proj", "v_proj", "down_proj"], use_rslora=True),
        name="code",
    )
    return [math, code]


def logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(IDS).logits


def swapped_by_hand(llama_dir: Path, adapters, choice: list[str]) -> torch.nn.Module:
    """The definition, densely: every module of layer l gets ΔW of adapter choice[l], nothing else."""
    model = AutoModelForCausalLM.from_pretrained(llama_dir)
    by_name = {a.name: a for a in adapters}
    with torch.no_grad():
        for name, adapter in by_name.items():
            for path, factors in adapter.modules.items():
                if choice[layer_index(path)] == name:
                    model.get_submodule(path).weight += factors.delta()
    return model


def test_rules_pick_edges_and_middle() -> None:
    rule = LayerSwapRule.from_mapping({"first": 2, "last": 1, "from": "math", "rest": "code"})
    assert [rule.adapter_for(i, 6) for i in range(6)] == ["math", "math", "code", "code", "code", "math"]
    assert rule.adapter_for(None, 6) == "code"
    explicit = LayerSwapRule.from_mapping({"layers": ["code", "math"], "other": "math"})
    assert [explicit.adapter_for(i, 2) for i in range(2)] == ["code", "math"]
    w = swap_weights(explicit, ["math", "code"], ["layer.1", "layer.0", "other"], 2)
    assert w.tolist() == [[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]]


@pytest.mark.parametrize(
    ("mapping", "layers", "message"),
    [
        ({"first": 1, "from": "math", "rest": "cod"}, 4, "adapter 'cod'"),
        ({"first": 3, "last": 2, "from": "math", "rest": "code"}, 4, "at most the 4 layers"),
        ({"layers": ["math"]}, 2, "one adapter name per layer"),
        ({"first": 1, "rest": "code"}, 4, "give 'rest'"),
    ],
)
def test_bad_rules_say_what_to_fix(mapping, layers, message) -> None:
    with pytest.raises(ConfigError, match=message):
        LayerSwapRule.from_mapping(mapping).validate(["math", "code"], layers)


def test_unknown_keys_are_errors() -> None:
    with pytest.raises(ConfigError, match="unknown key"):
        LayerSwapRule.from_mapping({"frist": 2, "rest": "code"})


@pytest.mark.parametrize("choice", [["math", "code"], ["code", "math"], ["math", "math"]])
def test_layer_swap_is_cat_with_one_hot_weights(choice, llama_dir: Path, adapters) -> None:
    rule = LayerSwapRule(layers=tuple(choice))
    swap = compose_layer_swap(AutoModelForCausalLM.from_pretrained(llama_dir), adapters, rule)
    got = logits(swap.model)
    torch.testing.assert_close(
        got, logits(swapped_by_hand(llama_dir, adapters, choice)), atol=1e-5, rtol=1e-5
    )

    cat = compose_cat(
        AutoModelForCausalLM.from_pretrained(llama_dir),
        adapters,
        granularity="layer",
        parameterisation="free",
    )
    one_hot = torch.tensor(
        [[1.0, 0.0] if choice[int(g.split(".")[1])] == "math" else [0.0, 1.0] for g in cat.group_names]
    )
    cat.set_effective_weights(one_hot)
    torch.testing.assert_close(got, logits(cat.model), atol=0, rtol=0)


def test_export_reloads_in_stock_peft(llama_dir: Path, adapters, tmp_path: Path) -> None:
    rule = LayerSwapRule.from_mapping({"first": 1, "from": "math", "rest": "code"})
    swap = compose_layer_swap(AutoModelForCausalLM.from_pretrained(llama_dir), adapters, rule)
    expected = logits(swap.model)

    folded = fold_composition(swap)  # CAT's exact export path
    save_peft_adapter(folded, tmp_path / "cat", base_model=str(llama_dir))
    reloaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(llama_dir), tmp_path / "cat")
    assert float((logits(reloaded) - expected).abs().max()) <= 1e-5

    compact = layer_swap_factors(adapters, rule)  # the same fold, the zero rank rows dropped
    assert sorted(compact) == sorted(folded)
    assert next(iter(compact.values())).rank == 4  # the largest chosen rank, not 4 + 2
    for path, factors in compact.items():
        assert factors.scale == 1.0
        torch.testing.assert_close(factors.delta(), folded[path].delta(), atol=1e-6, rtol=1e-6)
    save_peft_adapter(compact, tmp_path / "compact", base_model=str(llama_dir))
    reloaded = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(llama_dir), tmp_path / "compact"
    )
    assert float((logits(reloaded) - expected).abs().max()) <= 1e-5


def test_count_layers_reads_the_paths() -> None:
    assert count_layers(["model.layers.0.q_proj", "model.layers.11.mlp.up_proj", "lm_head"]) == 12
    assert layer_index("lm_head") is None


def test_module_rows_are_one_hot_per_layer() -> None:
    paths = ["model.layers.0.q_proj", "model.layers.1.q_proj", "model.layers.2.q_proj", "lm_head"]
    rule = LayerSwapRule(first=1, last=1, edges="math", rest="code", other="math")
    rows = module_swap_weights(rule, ["math", "code"], paths)
    assert rows == {
        "model.layers.0.q_proj": [1.0, 0.0],
        "model.layers.1.q_proj": [0.0, 1.0],
        "model.layers.2.q_proj": [1.0, 0.0],
        "lm_head": [1.0, 0.0],
    }


def test_cli_merge_layer_swap_equals_cat_with_one_hot_weights(llama_dir: Path, make_lora, tmp_path) -> None:
    """`lorasoup merge --method layer_swap` with a `layer_swap:` section and `--set` overrides: the
    stock-PEFT reload gives the logits of the CAT model with the rule's one-hot weights."""
    math = make_lora("math", r=4, seed=1)
    code = make_lora("code", r=2, seed=2, targets=["q_proj", "v_proj", "down_proj"], use_rslora=True)
    config = tmp_path / "swap.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "method": "layer_swap",
                "adapters": [{"path": str(math)}, {"path": str(code)}],
                "layer_swap": {"first": 0, "edges": "math", "rest": "code"},
                "output": str(tmp_path / "out"),
            }
        )
    )
    result = CliRunner().invoke(app, ["merge", str(config), "--set", "layer_swap.first=1"])
    assert result.exit_code == 0, result.output
    adapters = [load_adapter(math, name="math"), load_adapter(code, name="code")]
    swap = compose_layer_swap(
        AutoModelForCausalLM.from_pretrained(llama_dir),
        adapters,
        LayerSwapRule(first=1, edges="math", rest="code"),
    )
    reloaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(llama_dir), tmp_path / "out")
    assert float((logits(reloaded) - logits(swap.model)).abs().max()) <= 1e-5


def test_cli_merge_layer_swap_needs_its_section_and_names(make_lora, tmp_path) -> None:
    math, code = make_lora("math", r=4, seed=1), make_lora("code", r=2, seed=2)
    base = [
        "merge",
        "--method",
        "layer_swap",
        "-a",
        str(math),
        "-a",
        str(code),
        "--output",
        str(tmp_path / "o"),
    ]
    missing = CliRunner().invoke(app, base)
    assert missing.exit_code == 2 and "add a layer_swap: section" in missing.output
    wrong = CliRunner().invoke(app, [*base, "--set", "layer_swap.rest=chem"])
    assert wrong.exit_code == 2 and "'chem'" in wrong.output and "math, code" in wrong.output
    extra = CliRunner().invoke(
        app,
        [
            "merge",
            "--method",
            "linear",
            "-a",
            str(math),
            "--output",
            str(tmp_path / "p"),
            "--set",
            "layer_swap.rest=math",
        ],
    )
    assert extra.exit_code == 2 and "remove it" in extra.output
    ranked = CliRunner().invoke(app, [*base, "--set", "layer_swap.rest=math", "--rank", "2"])
    assert ranked.exit_code == 2 and "keeps the adapters' rank" in ranked.output


def test_a_swapped_module_stays_on_its_factors_device() -> None:
    """The GPU study merges on CUDA: the fold's coefficients follow the factors' device (a CPU table
    times CUDA factors failed there). The meta device stands in for CUDA: mixing it with a CPU tensor
    fails the same way."""
    from lorasoup.adapters import LoraFactors
    from lorasoup.merging.base import MergeParams
    from lorasoup.merging.layer_swap import merge_swapped

    factors = [LoraFactors(torch.empty(4, 8, device="meta"), torch.empty(6, 4, device="meta"), 2.0)] * 2
    merged = merge_swapped(factors, torch.tensor([0.0, 1.0]), MergeParams(), torch.Generator())
    assert merged.A.device.type == merged.B.device.type == "meta"
    assert tuple(merged.A.shape) == (4, 8) and tuple(merged.B.shape) == (6, 4)
