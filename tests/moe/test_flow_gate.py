"""LoRA-Flow gates: soft per-layer gates on the block input, trained alone, distilled to CAT exactly."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from lorasoup.cat.fold import fold_composition
from lorasoup.cat.inject import compose_cat
from lorasoup.errors import ConfigError
from lorasoup.export.peft import save_peft_adapter
from lorasoup.moe.config import MoeTrainOptions
from lorasoup.moe.flow_gate import compose_flow, distill_flow, train_flow_gates

IDS = torch.tensor([[1, 5, 9, 14, 20, 33, 41, 7], [3, 8, 2, 11, 19, 27, 6, 40]])


def logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(IDS).logits


def constant_gates(composition, seed: int = 3) -> torch.Tensor:
    """``W_l = 0``, a random ``b_l``: every token of layer l gets ``softmax(b_l)``; returns those (L, K)."""
    generator = torch.Generator().manual_seed(seed)
    rows = []
    with torch.no_grad():
        for gate in composition.routers:
            gate.weight.zero_()
            gate.bias.copy_(torch.randn(gate.bias.shape, generator=generator) * 2)
            rows.append(torch.softmax(gate.bias, -1))
    return torch.stack(rows)


def test_one_soft_gate_per_layer_reading_the_hidden_state(llama_dir: Path, adapters) -> None:
    flow = compose_flow(AutoModelForCausalLM.from_pretrained(llama_dir), adapters)
    assert flow.group_names == ["model.layers.0", "model.layers.1"]
    assert [tuple(g.weight.shape) for g in flow.routers] == [(2, 32), (2, 32)]  # (K, hidden)
    assert flow.top_k is None and flow.granularity == "layer"


def test_constant_gates_are_static_cat_and_distil_to_an_exact_peft_export(
    llama_dir: Path, adapters, data, tmp_path: Path
) -> None:
    dataset, collate_fn = data
    flow = compose_flow(AutoModelForCausalLM.from_pretrained(llama_dir), adapters)
    weights = constant_gates(flow)
    flow_logits = logits(flow.model)

    cat = compose_cat(
        AutoModelForCausalLM.from_pretrained(llama_dir),
        adapters,
        granularity="layer",
        parameterisation="free",
    )
    cat.set_effective_weights(torch.stack([weights[int(g.split(".")[1])] for g in cat.group_names]))
    torch.testing.assert_close(flow_logits, logits(cat.model), atol=1e-5, rtol=1e-5)

    distilled, gates = distill_flow(flow, dataset, collate_fn, batch_size=5)
    torch.testing.assert_close(gates, weights, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(logits(distilled.model), flow_logits, atol=1e-5, rtol=1e-5)

    save_peft_adapter(fold_composition(distilled), tmp_path / "flow", base_model=str(llama_dir))
    reloaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(llama_dir), tmp_path / "flow")
    assert float((logits(reloaded) - flow_logits).abs().max()) <= 1e-5


def test_token_dependent_gates_distil_to_their_mean(llama_dir: Path, adapters, data) -> None:
    dataset, collate_fn = data
    flow = compose_flow(AutoModelForCausalLM.from_pretrained(llama_dir), adapters, init_std=0.5)
    with torch.no_grad(), flow.recording() as records:
        flow.model(**collate_fn(list(dataset)))
    mask = collate_fn(list(dataset))["attention_mask"].reshape(-1).bool()
    expected = torch.stack([r.gates.reshape(-1, 2)[mask].mean(0) for r in records])
    distilled, gates = distill_flow(flow, dataset, collate_fn, batch_size=7)
    torch.testing.assert_close(gates, expected, atol=1e-5, rtol=1e-5)
    assert distilled.weights.parameterisation == "free"


def test_training_moves_only_the_gates_on_the_lm_loss_alone(llama_dir: Path, adapters, data) -> None:
    dataset, collate_fn = data
    flow = compose_flow(AutoModelForCausalLM.from_pretrained(llama_dir), adapters)
    frozen = {n: p.detach().clone() for n, p in flow.model.named_parameters() if not p.requires_grad}
    gates = [p.detach().clone() for p in flow.routers.parameters()]
    options = MoeTrainOptions(learning_rate=0.1, max_steps=3, batch_size=8, warmup=0, device="cpu")
    result = train_flow_gates(flow, dataset, collate_fn, options)
    assert result.steps == 3
    assert result.losses == pytest.approx(result.lm_losses)  # no balancing term
    for name, p in flow.model.named_parameters():
        if name in frozen:
            assert torch.equal(p, frozen[name]), name
    assert all(not torch.equal(a, b) for a, b in zip(gates, flow.routers.parameters(), strict=True))


def test_a_routed_moe_is_not_a_flow(compose, data) -> None:
    dataset, collate_fn = data
    with pytest.raises(ConfigError, match="compose_flow"):
        distill_flow(compose(granularity="module"), dataset, collate_fn)
