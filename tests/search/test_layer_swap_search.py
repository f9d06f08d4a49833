"""Choosing a layer swap by search: the family is as documented, the choice is the family's minimum
(checked against an independent loop), a planted rule is found, and the export is a stock PEFT adapter
equal to `lorasoup merge --method layer_swap`'s for the chosen rule."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM
from typer.testing import CliRunner

from lorasoup.adapters import load_adapter
from lorasoup.cat.inject import compose_cat
from lorasoup.cli import app
from lorasoup.config import load_config
from lorasoup.errors import ConfigError, DataError
from lorasoup.merging.layer_swap import LayerSwapRule, compose_layer_swap, swap_weights
from lorasoup.search.config import SearchRunConfig
from lorasoup.search.layer_swap import (
    describe_rule,
    family_size,
    rule_section,
    search_layer_swap,
    swap_candidates,
)
from lorasoup.training.data import collate
from tests.conftest import TINY_DECODER, make_peft_lora

LAYERS = 4
NAMES = ["a", "b", "c"]
PLANTED = LayerSwapRule(first=1, last=1, edges="c", rest="a")  # an `edges` rule: 0 c | 1-2 a | 3 c
RECORDS = [{"instruction": f"add {a} {b}", "output": str(a + b)} for a in range(4) for b in range(3)]


@pytest.fixture(scope="module")
def deep_llama_dir(tmp_path_factory, tokenizer) -> Path:
    """A 4-layer tiny Llama with sharp outputs (initializer_range 0.2; see tests/search/conftest.py)."""
    path = tmp_path_factory.mktemp("deep-llama")
    torch.manual_seed(0)
    shape = TINY_DECODER | {"num_hidden_layers": LAYERS}
    config = LlamaConfig(vocab_size=len(tokenizer), pad_token_id=0, initializer_range=0.2, **shape)
    LlamaForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def swap_adapters(tmp_path_factory, deep_llama_dir) -> list[Path]:
    """Three strong random LoRAs (scale 4); ``b`` has another rank and fewer modules."""
    root = tmp_path_factory.mktemp("swap-adapters")
    return [
        make_peft_lora(deep_llama_dir, root / "a", r=4, alpha=16, seed=1),
        make_peft_lora(
            deep_llama_dir, root / "b", r=2, alpha=8, seed=2, targets=["q_proj", "v_proj", "down_proj"]
        ),
        make_peft_lora(deep_llama_dir, root / "c", r=4, alpha=16, seed=3),
    ]


def compose(base_dir, adapter_dirs):
    adapters = [load_adapter(path, name=name) for path, name in zip(adapter_dirs, NAMES, strict=True)]
    model = AutoModelForCausalLM.from_pretrained(base_dir)
    return compose_cat(model, adapters, granularity="layer", parameterisation="free")


@pytest.fixture(scope="module")
def planted_examples(deep_llama_dir, swap_adapters):
    """16 continuations of 16 tokens sampled from the planted swap: the expected loss of a rule is
    H(p*) + KL(p* || p_rule), least for the planted rule."""
    adapters = [load_adapter(path, name=name) for path, name in zip(swap_adapters, NAMES, strict=True)]
    swap = compose_layer_swap(AutoModelForCausalLM.from_pretrained(deep_llama_dir), adapters, PLANTED)
    g = torch.Generator().manual_seed(0)
    ids = torch.cat([torch.ones(16, 1, dtype=torch.long), torch.randint(4, 90, (16, 2), generator=g)], 1)
    with torch.no_grad():
        for _ in range(16):
            probs = torch.softmax(swap.model.eval()(input_ids=ids).logits[:, -1], -1)
            ids = torch.cat([ids, torch.multinomial(probs, 1, generator=g)], 1)
    return [
        {"input_ids": row.tolist(), "attention_mask": [1] * len(row), "labels": [-100] * 3 + row[3:].tolist()}
        for row in ids
    ]


@pytest.mark.parametrize("k", [2, 3, 4])
@pytest.mark.parametrize("layers", [1, 2, 3, 4, 7, 32])
def test_family_size_is_as_documented(k, layers) -> None:
    names = [f"s{i}" for i in range(k)]
    candidates = swap_candidates(names, layers)
    documented = k + k * (k - 1) * (layers - 1) + k * (k - 1) * ((layers - 1) // 2)
    assert len(candidates) == family_size(k, layers) == documented
    assignments = {tuple(c.rule.adapter_for(i, layers) for i in range(layers)) for c in candidates}
    assert len(assignments) == len(candidates)  # every candidate a different per-layer choice
    for family in ("uniform", "blocks", "edges"):
        only = swap_candidates(names, layers, families=[family])
        assert len(only) == family_size(k, layers, [family])
        assert all(c.family == family for c in only)
    assert family_size(2, 32) == 94  # the number the docs give


def test_rules_read_as_merge_sections() -> None:
    rule = LayerSwapRule(first=1, last=1, edges="c", rest="a")
    assert rule_section(rule) == {"first": 1, "last": 1, "edges": "c", "rest": "a"}
    assert describe_rule(rule, 4) == "0 c | 1-2 a | 3 c"
    assert describe_rule(LayerSwapRule(rest="b"), 4) == "0-3 b"


def brute_force_losses(base_dir, adapter_dirs, examples, rules) -> list[float]:
    """Independently of search.scoring: θ set to each rule's one-hot table, transformers' own loss."""
    composition = compose(base_dir, adapter_dirs)
    batch = collate(examples, pad_token_id=0)
    losses = []
    with torch.no_grad():
        for rule in rules:
            w = swap_weights(rule, composition.adapter_names, composition.group_names, LAYERS)
            composition.set_effective_weights(w)
            losses.append(float(composition.model.eval()(**batch).loss))
    return losses


def test_search_picks_the_family_minimum_and_the_planted_rule(
    deep_llama_dir, swap_adapters, planted_examples
) -> None:
    composition = compose(deep_llama_dir, swap_adapters)
    composition.model.train()
    seen = []
    result = search_layer_swap(
        composition,
        planted_examples,
        pad_token_id=0,
        rows_per_forward=40,  # 2 candidates x 16 examples per forward: chunks, and progress per chunk
        progress=lambda done, total: seen.append((done, total)),
    )
    assert len(result.candidates) == family_size(3, LAYERS) == 27
    assert seen[-1] == (27, 27) and len(seen) == 14

    expected = brute_force_losses(
        deep_llama_dir, swap_adapters, planted_examples, [c.rule for c in result.candidates]
    )
    torch.testing.assert_close(result.losses, torch.tensor(expected), atol=1e-5, rtol=0)
    assert expected[result.best] <= min(expected) + 1e-5
    assert result.rule == PLANTED, describe_rule(result.rule, LAYERS)
    runner_up = sorted(expected)[1]
    assert runner_up - min(expected) > 0.05  # clearly best, not a near-tie

    # θ now holds the chosen rule's one-hot table: the composition is compose_layer_swap(PLANTED)
    planted = swap_weights(PLANTED, NAMES, composition.group_names, LAYERS)
    assert torch.equal(composition.effective_weights(), planted) and torch.equal(result.weights, planted)
    assert composition.model.training  # the mode it was in


@pytest.mark.parametrize(
    ("scores", "best"),
    [
        ([0.5, 0.5, 0.5], 0),  # a three-way tie: the first in the family's order
        ([0.7, 0.5, 0.5], 1),
        ([float("nan"), 0.9, float("inf")], 1),  # non-finite losses are never chosen
    ],
)
def test_ties_go_to_the_first_candidate(
    monkeypatch, deep_llama_dir, swap_adapters, planted_examples, scores, best
) -> None:
    import lorasoup.search.layer_swap as module

    monkeypatch.setattr(module, "score_population", lambda *args, **kwargs: torch.tensor(scores))
    composition = compose(deep_llama_dir, swap_adapters)
    result = search_layer_swap(composition, planted_examples[:2], pad_token_id=0, families=["uniform"])
    assert [c.rule.rest for c in result.candidates] == NAMES
    assert result.best == best and result.ranking()[0] == best
    first = result.table()[0]["loss"]
    assert first is None if math.isnan(scores[0]) else first == pytest.approx(scores[0])


def test_all_non_finite_is_an_error(monkeypatch, deep_llama_dir, swap_adapters, planted_examples):
    import lorasoup.search.layer_swap as module

    monkeypatch.setattr(module, "score_population", lambda *args, **kwargs: torch.full((3,), float("nan")))
    with pytest.raises(DataError, match="non-finite"):
        search_layer_swap(
            compose(deep_llama_dir, swap_adapters), planted_examples[:2], pad_token_id=0, families=["uniform"]
        )


def test_library_refuses_what_it_cannot_search(deep_llama_dir, swap_adapters, planted_examples) -> None:
    adapters = [load_adapter(path, name=name) for path, name in zip(swap_adapters, NAMES, strict=True)]
    model = AutoModelForCausalLM.from_pretrained(deep_llama_dir)
    module_level = compose_cat(model, adapters, granularity="module", parameterisation="free")
    with pytest.raises(ValueError, match="granularity='layer'"):
        search_layer_swap(module_level, planted_examples, pad_token_id=0)
    composition = compose(deep_llama_dir, swap_adapters)
    with pytest.raises(ConfigError, match="adapter 'z'"):
        search_layer_swap(composition, planted_examples, pad_token_id=0, other="z")
    with pytest.raises(ConfigError, match="choose from uniform, blocks, edges"):
        search_layer_swap(composition, planted_examples, pad_token_id=0, families=["diagonal"])


def write_config(tmp_path, base_dir, adapter_dirs, **extra):
    data = tmp_path / "target.json"
    data.write_text(json.dumps(RECORDS))
    config = {
        "base_model": str(base_dir),
        "adapters": [{"path": str(p), "name": n} for p, n in zip(adapter_dirs, NAMES, strict=True)],
        "data": {"train": [str(data)], "template": "plain", "cutoff_len": 32},
        "output": str(tmp_path / "out"),
        **extra,
    }
    path = tmp_path / "search.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def logits(model, ids):
    with torch.no_grad():
        return model.eval()(input_ids=ids).logits


def test_cli_layer_swap_writes_the_chosen_swap_as_a_merge_would(tmp_path, deep_llama_dir, swap_adapters):
    from peft import PeftModel

    config = write_config(tmp_path, deep_llama_dir, swap_adapters)
    result = CliRunner().invoke(app, ["search", str(config), "--layer-swap", "--set", "export.merge=true"])
    assert result.exit_code == 0, result.output
    assert "chosen:" in result.output and "wrote" in result.output
    out = tmp_path / "out"
    assert {p.name for p in out.iterdir()} == {
        "adapter_config.json",
        "adapter_model.safetensors",
        "search_weights.json",
        "run.json",
        "cat-warm-start.yaml",
        "merged",
    }
    run = json.loads((out / "run.json").read_text())
    swap = run["layer_swap"]
    assert run["command"] == "search" and swap["num_layers"] == LAYERS
    assert len(swap["candidates"]) == swap["candidates_scored"] == family_size(3, LAYERS)
    losses = [c["loss"] for c in swap["candidates"]]
    assert swap["best_loss"] == min(losses) == losses[swap["best_index"]]
    assert swap["candidates"][swap["best_index"]]["rule"] == swap["rule"]
    rule = LayerSwapRule.from_mapping(swap["rule"])

    # stock PEFT reproduces CAT with the chosen rule's one-hot weights (and so does merged/)
    composition = compose(deep_llama_dir, swap_adapters)
    composition.set_effective_weights(swap_weights(rule, NAMES, composition.group_names, LAYERS))
    ids = torch.randint(4, 90, (2, 9), generator=torch.Generator().manual_seed(0))
    expected = logits(composition.model, ids)
    reloaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(deep_llama_dir), out)
    torch.testing.assert_close(logits(reloaded, ids), expected, atol=1e-5, rtol=0)
    merged = AutoModelForCausalLM.from_pretrained(out / "merged")
    torch.testing.assert_close(logits(merged, ids), expected, atol=1e-5, rtol=0)

    # the same adapter `lorasoup merge --method layer_swap` writes for the recorded rule
    merge_config = tmp_path / "merge.yaml"
    merge_config.write_text(
        yaml.safe_dump(
            {
                "method": "layer_swap",
                "adapters": [{"path": str(p), "name": n} for p, n in zip(swap_adapters, NAMES, strict=True)],
                "layer_swap": swap["rule"] | {"num_layers": LAYERS},
                "output": str(tmp_path / "merged-swap"),
            }
        )
    )
    merged_run = CliRunner().invoke(app, ["merge", str(merge_config)])
    assert merged_run.exit_code == 0, merged_run.output
    ours, theirs = (load_file(str(d / "adapter_model.safetensors")) for d in (out, tmp_path / "merged-swap"))
    assert sorted(ours) == sorted(theirs)
    for key in ours:
        assert torch.equal(ours[key], theirs[key]), key

    # search_weights.json is the chosen one-hot table per layer (cat.init_from reads it)
    saved = json.loads((out / "search_weights.json").read_text())
    assert saved["granularity"] == "layer" and saved["adapters"] == NAMES
    for group, row in saved["weights"].items():
        chosen = rule.adapter_for(int(group.split(".")[1]), LAYERS)
        assert row == {n: float(n == chosen) for n in NAMES}


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--layer-swap", "--set", "search.population=8"], "search.population: the layer-swap search"),
        (["--set", "layer_swap.families=[diagonal]"], "choose one of 'uniform', 'blocks', 'edges'"),
        (["--layer-swap", "--set", "export.rank=2"], "keeps the chosen adapters' ranks"),
        (["--layer-swap", "--set", "layer_swap.other=z"], "adapter 'z'"),
    ],
)
def test_cli_bad_input_is_one_line_and_writes_nothing(tmp_path, deep_llama_dir, swap_adapters, args, message):
    config = write_config(tmp_path, deep_llama_dir, swap_adapters)
    result = CliRunner().invoke(app, ["search", str(config), *args])
    assert result.exit_code == 2, result.output
    assert message in result.output and "error:" in result.output
    assert not (tmp_path / "out").exists()
    assert {p.name for p in tmp_path.iterdir()} == {"target.json", "search.yaml"}


def test_one_adapter_is_refused_at_load(tmp_path, deep_llama_dir, swap_adapters):
    config = write_config(tmp_path, deep_llama_dir, swap_adapters)
    with pytest.raises(ConfigError, match="list at least two"):
        load_config(SearchRunConfig, config, [f"adapters=[{swap_adapters[0]}]", "layer_swap.other=a"])


def test_shipped_layer_swap_search_config_loads():
    path = Path(__file__).parents[2] / "configs" / "search-layer-swap.yaml"
    config = load_config(SearchRunConfig, path)
    assert config.layer_swap is not None and config.layer_swap.families == ["uniform", "blocks", "edges"]
    assert [a.name for a in config.adapters] == ["math", "code"]


def test_each_runner_refuses_the_other_kind_of_config(tmp_path, deep_llama_dir, swap_adapters):
    from lorasoup.search.layer_swap_run import run_layer_swap_search
    from lorasoup.search.run import run_search

    weights = load_config(SearchRunConfig, write_config(tmp_path, deep_llama_dir, swap_adapters))
    swap = load_config(SearchRunConfig, write_config(tmp_path, deep_llama_dir, swap_adapters, layer_swap={}))
    with pytest.raises(ConfigError, match="add a layer_swap: section"):
        run_layer_swap_search(weights)
    with pytest.raises(ConfigError, match="run_layer_swap_search"):
        run_search(swap)
    assert not (tmp_path / "out").exists()
