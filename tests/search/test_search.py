"""The search end to end: a planted optimum is found, runs repeat, the artifact is a stock PEFT adapter."""

import json
from pathlib import Path

import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM
from typer.testing import CliRunner

from lorasoup.adapters import load_adapter
from lorasoup.cat.config import CatRunConfig
from lorasoup.cat.inject import compose_cat, weights_from_file
from lorasoup.cli import app
from lorasoup.config import load_config
from lorasoup.errors import ConfigError
from lorasoup.search.config import SearchOptions, SearchRunConfig
from lorasoup.search.run import search_weights

PLANTED = torch.tensor([[0.8, -0.5]])  # (G=1, K=2): global weights of the two strong adapters
TOLERANCE = 0.1
"""Per weight. The targets are 16 x 20 tokens sampled from the planted model; their loss is minimal
at about (0.76, -0.49), within 0.05 of the planted weights, and rises by ~0.06 nats 0.1 away."""
RECORDS = [{"instruction": f"add {a} {b}", "output": str(a + b)} for a in range(4) for b in range(3)]


def compose(base_dir, adapter_dirs, granularity="global"):
    model = AutoModelForCausalLM.from_pretrained(base_dir)
    adapters = [load_adapter(path) for path in adapter_dirs]
    return compose_cat(model, adapters, granularity=granularity, parameterisation="free")


@pytest.fixture(scope="module")
def planted_examples(sharp_llama_dir, strong_adapters):
    """Continuations sampled (temperature 1) from the model with the planted weights: the expected
    loss of any weighting is H(p*) + KL(p* || p_w), smallest at the planted weights."""
    composition = compose(sharp_llama_dir, strong_adapters)
    composition.set_effective_weights(PLANTED)
    g = torch.Generator().manual_seed(0)
    ids = torch.cat([torch.ones(16, 1, dtype=torch.long), torch.randint(4, 90, (16, 2), generator=g)], 1)
    with torch.no_grad():
        for _ in range(20):
            probs = torch.softmax(composition.model(input_ids=ids).logits[:, -1], -1)
            ids = torch.cat([ids, torch.multinomial(probs, 1, generator=g)], 1)
    return [
        {"input_ids": row.tolist(), "attention_mask": [1] * len(row), "labels": [-100] * 3 + row[3:].tolist()}
        for row in ids
    ]


def test_search_recovers_planted_weights(sharp_llama_dir, strong_adapters, planted_examples):
    composition = compose(sharp_llama_dir, strong_adapters)
    options = SearchOptions(population=8, iterations=15, l1=0.0, seed=0)
    result = search_weights(composition, planted_examples, pad_token_id=0, options=options)
    assert (result.weights - PLANTED).abs().max() <= TOLERANCE, result.weights
    assert result.objective < result.start_objective - 0.5  # from all-zero weights (the base model)
    assert result.table == {
        "global": {
            "a": pytest.approx(float(result.weights[0, 0])),
            "b": pytest.approx(float(result.weights[0, 1])),
        }
    }


def test_same_seed_same_result(sharp_llama_dir, strong_adapters, planted_examples):
    composition = compose(sharp_llama_dir, strong_adapters, granularity="layer")
    theta = composition.weights.theta.detach().clone()

    def run(seed):
        options = SearchOptions(population=4, iterations=3, seed=seed, rows_per_forward=24)
        return search_weights(composition, planted_examples[:8], pad_token_id=0, options=options)

    first, second, other = run(3), run(3), run(4)
    assert first.weights.shape == (2, 2)  # layer granularity: two blocks x two adapters
    assert torch.equal(first.weights, second.weights)
    assert first.trace.iteration_mean == second.trace.iteration_mean
    assert first.trace.iteration_mean != other.trace.iteration_mean
    assert torch.equal(composition.weights.theta, theta)


def write_config(tmp_path, base_dir, adapter_dirs, **search):
    data = tmp_path / "target.json"
    data.write_text(json.dumps(RECORDS))
    config = {
        "base_model": str(base_dir),
        "adapters": [{"path": str(adapter_dirs[0]), "name": "math"}, str(adapter_dirs[1])],
        "data": {"train": [str(data)], "template": "plain", "cutoff_len": 32},
        "output": str(tmp_path / "out"),
        "search": {"granularity": "layer", "population": 6, "iterations": 3, **search},
    }
    path = tmp_path / "search.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_search_command_writes_an_adapter_that_stock_peft_reproduces(
    tmp_path, sharp_llama_dir, strong_adapters
):
    from peft import PeftModel

    config = write_config(tmp_path, sharp_llama_dir, strong_adapters)
    result = CliRunner().invoke(
        app, ["search", str(config), "--set", "search.seed=2", "--set", "export.merge=true"]
    )
    assert result.exit_code == 0, result.output
    assert "wrote" in result.output
    out = tmp_path / "out"
    assert {p.name for p in out.iterdir()} >= {
        "adapter_config.json",
        "adapter_model.safetensors",
        "search_weights.json",
        "run.json",
        "cat-warm-start.yaml",
    }
    saved = json.loads((out / "search_weights.json").read_text())
    assert saved["adapters"] == ["math", "b"] and saved["granularity"] == "layer"
    found = torch.tensor(
        [[saved["weights"][g][n] for n in saved["adapters"]] for g in ("layer.0", "layer.1")]
    )
    assert found.abs().max() > 0  # the search moved away from the all-zero start

    composition = compose(sharp_llama_dir, strong_adapters, granularity="layer")
    composition.set_effective_weights(found)
    ids = torch.randint(4, 90, (2, 9), generator=torch.Generator().manual_seed(0))
    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(sharp_llama_dir), out).eval()
    with torch.no_grad():
        expected = composition.model(input_ids=ids).logits
        torch.testing.assert_close(peft_model(input_ids=ids).logits, expected, atol=1e-5, rtol=0)
        merged = AutoModelForCausalLM.from_pretrained(out / "merged").eval()
        torch.testing.assert_close(merged(input_ids=ids).logits, expected, atol=1e-5, rtol=0)

    run = json.loads((out / "run.json").read_text())
    history = run["search"]["history"]["best_so_far"]
    assert run["command"] == "search" and len(history) == run["search"]["iterations_run"] <= 3
    assert history == sorted(history, reverse=True) and history[-1] == run["search"]["best_objective"]
    assert run["search"]["evaluations"] == 1 + 6 * len(history)

    warm = load_config(CatRunConfig, out / "cat-warm-start.yaml")
    assert warm.cat.init_from == str((out / "search_weights.json").resolve())
    module_level = compose(sharp_llama_dir, strong_adapters, granularity="module")
    module_level.adapter_names[:] = ["math", "b"]
    spread = weights_from_file(warm.cat.init_from, module_level)
    for site in module_level.sites:
        assert torch.equal(spread[site.group], found[int(site.path.split(".")[2])])


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("search.bounds=[1.0, -1.0]", "low must be below high"),
        ("search.bounds=[-1.0]", r"search.bounds must be \[low, high\]"),
        ("search.population=1", "population must be at least 2"),
        ("search.init=2.0", "outside search.bounds"),
        ("search.optimiser=cmaes", "did you mean 'cma'"),
        ("search.granularity=token", "choose one of 'global', 'layer', 'module'"),
        ("search.l1=-0.1", "l1 must be >= 0"),
        ("search.populaton=4", "did you mean 'population'"),
    ],
)
def test_bad_configs_are_one_line_errors(tmp_path, sharp_llama_dir, strong_adapters, override, message):
    config = write_config(tmp_path, sharp_llama_dir, strong_adapters)
    with pytest.raises(ConfigError, match=message) as info:
        load_config(SearchRunConfig, config, [override])
    assert "\n" not in str(info.value)
    result = CliRunner().invoke(app, ["search", str(config), "--set", override])
    assert result.exit_code == 2 and "error:" in result.output


def test_shipped_search_config_loads():
    path = Path(__file__).parents[2] / "configs" / "search-example.yaml"
    config = load_config(SearchRunConfig, path)
    assert config.search.optimiser == "cma" and config.search.bounds == [-1.5, 1.5]
    assert [a.name for a in config.adapters] == ["math", "code"]
