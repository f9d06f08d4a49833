"""Merges of K = 3 and 4 adapters: the maths by definition, exports stock PEFT reproduces, PEFT's own K = 3.

Mixed ranks, partially overlapping targets, rsLoRA, a ``rank_pattern`` and a negative weight: the
task vectors of K adapters are merged module by module (absent adapters contribute zero, and do not
vote in TIES' sign election).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from lorasoup.adapters import load_adapter
from lorasoup.config import load_config
from lorasoup.export.peft import merge_factors_into
from lorasoup.merging import MERGE_METHODS, MergeParams
from lorasoup.merging.config import MergeRunConfig
from lorasoup.merging.run import merge_adapters, run_merge
from tests.conftest import make_peft_lora

SKILLS = [
    {"r": 4, "alpha": 8, "seed": 1},
    {"r": 2, "alpha": 4, "seed": 2, "targets": ["q_proj", "v_proj"]},
    {"r": 3, "alpha": 3, "seed": 3, "targets": ["up_proj", "v_proj", "down_proj"], "use_rslora": True},
    {"r": 5, "alpha": 10, "seed": 4, "rank_pattern": {"q_proj": 1}},
]
WEIGHTS = [0.9, 0.6, -0.5, 0.7]
IDS = torch.randint(4, 90, (2, 9), generator=torch.Generator().manual_seed(0))
DELTA_METHODS = [name for name in MERGE_METHODS if MERGE_METHODS.get(name).space == "delta"]
FACTOR_METHODS = [name for name in MERGE_METHODS if MERGE_METHODS.get(name).space == "factor"]


def logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(input_ids=IDS).logits


@pytest.fixture(scope="module")
def skills(llama_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    root = tmp_path_factory.mktemp("skills")
    return [make_peft_lora(llama_dir, root / f"skill{i}", **kwargs) for i, kwargs in enumerate(SKILLS)]


def params_for(name: str) -> dict:
    method = MERGE_METHODS.get(name)
    params: dict = {"density": 0.5} if method.uses_density else {}
    if method.space == "delta" and name != "linear":
        params["rank"] = 6
    return params


@pytest.mark.parametrize("name", DELTA_METHODS)
@pytest.mark.parametrize("k", [3, 4])
def test_k_adapter_merge_exports_what_stock_peft_reproduces(name, k, skills, llama_dir, tmp_path):
    config = {
        "method": name,
        "adapters": [{"path": str(p), "weight": w} for p, w in zip(skills[:k], WEIGHTS, strict=False)],
        "parameters": params_for(name),
        "output": str(tmp_path / "out"),
        "seed": 5,
        "device": "cpu",
    }
    result = run_merge(load_config(MergeRunConfig, base=config))
    adapters = [load_adapter(p) for p in skills[:k]]
    modules = sorted({m for a in adapters for m in a.modules})
    assert sorted(result.modules) == modules
    intended, _ = merge_adapters(
        adapters,
        WEIGHTS[:k],
        MERGE_METHODS.get(name),
        MergeParams(**params_for(name)),
        modules=modules,
        seed=5,
        device="cpu",
    )
    expected = logits(merge_factors_into(AutoModelForCausalLM.from_pretrained(llama_dir), intended))
    peft = logits(
        PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(llama_dir), tmp_path / "out")
    )
    assert (peft - expected).abs().max() <= 1e-5
    if name == "linear":  # exact: Σ_i w_i ΔW_i, rank = the largest per-module sum of ranks
        merged = load_adapter(tmp_path / "out")
        for path in modules:
            want = sum(
                w * a.modules[path].delta()
                for w, a in zip(WEIGHTS, adapters, strict=False)
                if path in a.modules
            )
            torch.testing.assert_close(merged.modules[path].delta(), want, atol=1e-5, rtol=1e-5)


def ties_by_definition(tasks: list[torch.Tensor], weights: list[float], density: float) -> torch.Tensor:
    """TIES (https://arxiv.org/abs/2306.01708), one task at a time: trim, elect by mass, disjoint mean."""
    trimmed = []
    for task, weight in zip(tasks, weights, strict=True):
        keep = max(1, int(density * task.numel()))
        threshold = task.abs().flatten().topk(keep).values.min()
        trimmed.append(weight * torch.where(task.abs() >= threshold, task, torch.zeros_like(task)))
    sign = torch.where(sum(trimmed) >= 0, 1.0, -1.0)
    total, count = torch.zeros_like(tasks[0]), torch.zeros_like(tasks[0])
    for task in trimmed:
        agrees = (task.sign() == sign) & (task != 0)
        total += torch.where(agrees, task, torch.zeros_like(task))
        count += agrees.float()
    return total / count.clamp(min=1)


@pytest.mark.parametrize("k", [3, 4])
def test_ties_and_magnitude_prune_of_k_adapters_follow_the_definition(k, skills):
    adapters = [load_adapter(p) for p in skills[:k]]
    path = "model.layers.0.self_attn.v_proj"  # every skill adapts it
    assert all(path in a.modules for a in adapters)
    tasks = [a.modules[path].delta() for a in adapters]
    full = MergeParams(density=0.3, rank=64, svd="exact")  # rank ≥ the module's: no truncation
    generator = torch.Generator()
    factors = [a.modules[path] for a in adapters]
    ties = MERGE_METHODS.get("ties").merge(factors, torch.tensor(WEIGHTS[:k]), full, generator)
    torch.testing.assert_close(
        ties.B @ ties.A, ties_by_definition(tasks, WEIGHTS[:k], 0.3), atol=1e-5, rtol=1e-4
    )
    pruned = MERGE_METHODS.get("magnitude_prune").merge(factors, torch.tensor(WEIGHTS[:k]), full, generator)
    by_definition = sum(
        w * torch.where(t.abs() >= t.abs().flatten().topk(int(0.3 * t.numel())).values.min(), t, 0.0)
        for w, t in zip(WEIGHTS, tasks, strict=False)
    )
    torch.testing.assert_close(pruned.B @ pruned.A, by_definition, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize(
    ("name", "params"), [("linear", {}), ("ties", {"density": 0.4}), ("dare_ties", {"density": 0.6})]
)
def test_factor_variants_of_three_adapters_match_peft(name, params, llama_dir, make_lora, monkeypatch):
    paths = [
        make_lora("a", r=4, alpha=8, seed=1),
        make_lora("b", r=4, alpha=16, seed=2, use_rslora=True),
        make_lora("c", r=4, alpha=4, seed=3),
    ]
    weights = [0.8, -0.6, 0.5]
    model = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(llama_dir), paths[0], adapter_name="a0"
    )
    for i, path in enumerate(paths[1:], start=1):
        model.load_adapter(path, adapter_name=f"a{i}")
    # PEFT draws DARE masks from the global generator: record its state at the first draw and replay it.
    states: list[torch.Tensor] = []
    bernoulli = torch.bernoulli

    def recording_bernoulli(*args, **kwargs):
        if not states:
            states.append(torch.get_rng_state())
        return bernoulli(*args, **kwargs)

    monkeypatch.setattr(torch, "bernoulli", recording_bernoulli)
    model.add_weighted_adapter(["a0", "a1", "a2"], weights, "merged", combination_type=name, **params)
    monkeypatch.setattr(torch, "bernoulli", bernoulli)

    method = MERGE_METHODS.get(f"{name}_factor")
    assert bool(states) == method.random
    generator = torch.Generator()
    if states:
        generator.set_state(states[0])
    adapters = [load_adapter(p) for p in paths]
    checked = 0
    for module_name, module in model.base_model.model.named_modules():
        if not hasattr(module, "lora_A") or "merged" not in module.lora_A:
            continue
        ours = method.merge(
            [a.modules[module_name] for a in adapters],
            torch.tensor(weights),
            MergeParams(density=params.get("density", 1.0)),
            generator,
        )
        torch.testing.assert_close(ours.A, module.lora_A["merged"].weight, atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(ours.B, module.lora_B["merged"].weight, atol=1e-6, rtol=1e-5)
        checked += 1
    assert checked == len(adapters[0].modules) and set(FACTOR_METHODS) >= {f"{name}_factor"}
