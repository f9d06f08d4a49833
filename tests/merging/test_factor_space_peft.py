"""The ``*_factor`` methods reproduce PEFT's ``add_weighted_adapter`` numbers exactly."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from lorasoup.adapters import load_adapter
from lorasoup.merging import MERGE_METHODS, MergeParams

CASES = [
    ("linear", {}),
    ("ties", {"density": 0.4}),
    ("ties", {"density": 0.4, "majority_sign": "frequency"}),
    ("magnitude_prune", {"density": 0.3}),
    ("dare_linear", {"density": 0.5}),
    ("dare_ties", {"density": 0.6}),
]


@pytest.mark.parametrize(("combination", "params"), CASES, ids=[f"{c}-{i}" for i, (c, _) in enumerate(CASES)])
def test_factor_variants_match_peft(
    combination: str, params: dict, llama_dir: Path, make_lora, monkeypatch: pytest.MonkeyPatch
) -> None:
    first = make_lora("first", r=4, alpha=8, seed=1)
    second = make_lora("second", r=4, alpha=16, seed=2, use_rslora=True)
    weights = [0.8, -0.6]

    model = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(llama_dir), first, adapter_name="a"
    )
    model.load_adapter(second, adapter_name="b")
    peft_kwargs = {k: v for k, v in params.items() if k != "majority_sign"}
    if "majority_sign" in params:
        peft_kwargs["majority_sign_method"] = params["majority_sign"]
    # PEFT draws DARE masks from the global generator, after initialising the new adapter's layers (which
    # also draws). Record the generator's state at PEFT's first mask draw and replay it in ours.
    states: list[torch.Tensor] = []
    bernoulli = torch.bernoulli

    def recording_bernoulli(*args, **kwargs):
        if not states:
            states.append(torch.get_rng_state())
        return bernoulli(*args, **kwargs)

    monkeypatch.setattr(torch, "bernoulli", recording_bernoulli)
    model.add_weighted_adapter(["a", "b"], weights, "merged", combination_type=combination, **peft_kwargs)
    monkeypatch.setattr(torch, "bernoulli", bernoulli)

    adapters = [load_adapter(first), load_adapter(second)]
    method = MERGE_METHODS.get(f"{combination}_factor")
    generator = torch.Generator()  # one stream, walked in PEFT's module order
    if states:
        generator.set_state(states[0])
    assert bool(states) == method.random
    merge_params = MergeParams(
        density=params.get("density", 1.0), majority_sign=params.get("majority_sign", "total")
    )
    checked = 0
    for name, module in model.base_model.model.named_modules():
        if not hasattr(module, "lora_A") or "merged" not in module.lora_A:
            continue
        ours = method.merge(
            [a.modules[name] for a in adapters], torch.tensor(weights), merge_params, generator
        )
        assert torch.allclose(ours.A, module.lora_A["merged"].weight, atol=1e-6), name
        assert torch.allclose(ours.B, module.lora_B["merged"].weight, atol=1e-6), name
        checked += 1
    assert checked == len(adapters[0].modules)
