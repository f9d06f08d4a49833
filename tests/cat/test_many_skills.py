"""CAT with K = 2, 3 and 4 skills end to end: train, export, reload in stock PEFT, merge, alike for every K.

Mixed ranks, partially overlapping target modules, rsLoRA and a ``rank_pattern``: the concatenated
rank differs per module, absent adapters are zero blocks, and the exported adapter (one rank, scale 1)
must still reproduce the trained CAT model's logits and the definition
``y = W0 x + Σ_i w_{m,i} s_i B_i A_i x`` computed one adapter at a time from ``cat_weights.json``.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from lorasoup.adapters import load_adapter
from lorasoup.cat.config import CatRunConfig
from lorasoup.cat.run import run_cat
from lorasoup.config import load_config

SKILLS = [  # name, make_lora kwargs
    ("math", {"r": 4, "alpha": 8, "seed": 1}),
    ("code", {"r": 2, "alpha": 4, "seed": 2, "targets": ["q_proj", "v_proj"]}),
    (
        "read",
        {"r": 3, "alpha": 3, "seed": 3, "targets": ["up_proj", "v_proj", "down_proj"], "use_rslora": True},
    ),
    ("know", {"r": 5, "alpha": 10, "seed": 4, "rank_pattern": {"q_proj": 1}}),
]
RECORDS = [
    {"instruction": f"what is {a} plus {b} ?", "output": f"the answer is {a + b}"}
    for a in range(4)
    for b in range(3)
]
IDS = torch.randint(4, 90, (2, 9), generator=torch.Generator().manual_seed(0))


def logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(input_ids=IDS).logits


def definition_logits(base_dir: Path, adapters, cat_weights: dict) -> torch.Tensor:
    """The CAT forward by its definition: each adapter's own ``s_i B_i A_i`` times its learned weight."""
    model = AutoModelForCausalLM.from_pretrained(base_dir)
    with torch.no_grad():
        for path, group in cat_weights["modules"].items():
            weight = model.get_submodule(path).weight
            for adapter in adapters:
                if path in adapter.modules:
                    weight += cat_weights["weights"][group][adapter.name] * adapter.modules[path].delta()
    return logits(model)


CASES = [  # K, granularity, parameterisation, export.merge
    (2, "module", "softmax", False),
    (3, "module", "softmax", False),
    (3, "layer", "free", True),
    (4, "module", "softmax", False),
    (4, "global", "free", True),
]


@pytest.mark.parametrize(("k", "granularity", "parameterisation", "merge"), CASES)
def test_k_skills_train_export_and_reload_like_two(
    k, granularity, parameterisation, merge, make_lora, llama_dir, tmp_path
):
    paths = {name: make_lora(name, **kwargs) for name, kwargs in SKILLS[:k]}
    data = tmp_path / "mix.json"
    data.write_text(json.dumps(RECORDS))
    config = {
        "base_model": str(llama_dir),
        "adapters": [{"path": str(path), "name": name} for name, path in paths.items()],
        "data": {"train": [str(data)], "template": "plain", "cutoff_len": 48},
        "output": str(tmp_path / "cat"),
        "cat": {"granularity": granularity, "parameterisation": parameterisation},
        "train": {"learning_rate": 0.2, "max_steps": 3, "batch_size": 4, "seed": k, "device": "cpu"},
        "export": {"merge": merge},
    }
    result = run_cat(load_config(CatRunConfig, base=config))
    out = tmp_path / "cat"
    adapters = [load_adapter(path, name=name) for name, path in paths.items()]

    # K weights per group; they trained (moved) and, under softmax, each group's row sums to 1.
    table = json.loads((out / "cat_weights.json").read_text())
    assert table["adapters"] == list(paths)
    w = torch.tensor([[row[name] for name in paths] for row in table["weights"].values()])
    groups = {"module": len(table["modules"]), "layer": 2, "global": 1}[granularity]
    assert w.shape == (groups, k)
    if parameterisation == "softmax":
        torch.testing.assert_close(w.sum(-1), torch.ones(groups))
    assert json.loads((out / "run.json").read_text())["weight_movement"]["weight_max_abs_change"] > 1e-3

    # One PEFT rank: the largest per-module sum of the present adapters' ranks.
    present_ranks = {}
    for adapter in adapters:
        for path, factors in adapter.modules.items():
            present_ranks[path] = present_ranks.get(path, 0) + factors.rank
    exported = load_adapter(out)
    assert exported.peft_config["r"] == exported.peft_config["lora_alpha"] == max(present_ranks.values())
    assert set(exported.modules) == set(present_ranks)

    peft = logits(PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(llama_dir), out))
    assert (peft - definition_logits(llama_dir, adapters, table)).abs().max() <= 1e-5
    if merge:
        assert (peft - logits(AutoModelForCausalLM.from_pretrained(out / "merged"))).abs().max() <= 1e-5
    else:
        assert (peft - logits(result.composition.model)).abs().max() <= 1e-5
