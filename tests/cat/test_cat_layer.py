"""The fused CAT layer against the definition, PEFT, and its own export."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import AutoModelForCausalLM

from lorasoup.adapters import load_adapter
from lorasoup.cat.fold import fold_composition
from lorasoup.cat.inject import compose_cat, remove_cat
from lorasoup.export.peft import merge_factors_into, save_peft_adapter
from lorasoup.export.serving import pad_rank


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.fixture
def ids():
    return torch.randint(4, 90, (2, 7), generator=torch.Generator().manual_seed(1))


def peft_logits(base_dir, adapter_dir, ids):
    from peft import PeftModel

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), adapter_dir)
    return logits(model.eval(), ids)


def set_free_weights(composition, values):
    with torch.no_grad():
        composition.weights.theta.copy_(torch.tensor(values).expand_as(composition.weights.theta))


def test_one_hot_weight_gives_the_single_adapter(make_lora, llama_dir, ids):
    paths = [make_lora("a", r=4, seed=1), make_lora("b", r=2, alpha=4, seed=2, targets=["q_proj", "v_proj"])]
    adapters = [load_adapter(p) for p in paths]
    for k, path in enumerate(paths):
        model = AutoModelForCausalLM.from_pretrained(llama_dir)
        composition = compose_cat(model, adapters, parameterisation="free")
        set_free_weights(composition, [1.0 if j == k else 0.0 for j in range(2)])
        torch.testing.assert_close(logits(model, ids), peft_logits(llama_dir, path, ids), atol=1e-5, rtol=0)


def naive_cat_logits(base_dir, adapters, weights_by_group, composition, ids):
    """The definition, one adapter at a time: y = W0 x + Σ_i w_i s_i B_i A_i x, via merged ΔW."""
    model = AutoModelForCausalLM.from_pretrained(base_dir)
    with torch.no_grad():
        for site in composition.sites:
            module = model.get_submodule(site.path)
            for k, adapter in enumerate(adapters):
                if site.path in adapter.modules:
                    module.weight += weights_by_group[site.group, k] * adapter.modules[site.path].delta()
    return logits(model, ids)


@pytest.mark.parametrize("granularity", ["module", "layer", "global"])
@pytest.mark.parametrize("parameterisation", ["softmax", "free"])
def test_fused_equals_definition_k3_mixed_ranks(make_lora, llama_dir, ids, granularity, parameterisation):
    adapters = [
        load_adapter(make_lora("a", r=4, seed=1)),
        load_adapter(make_lora("b", r=2, alpha=4, seed=2, targets=["q_proj", "v_proj"])),
        load_adapter(make_lora("c", r=3, alpha=3, seed=3, targets=["up_proj", "v_proj"], use_rslora=True)),
    ]
    model = AutoModelForCausalLM.from_pretrained(llama_dir)
    composition = compose_cat(
        model, adapters, granularity=granularity, parameterisation=parameterisation, seed=5
    )
    if parameterisation == "free":
        with torch.no_grad():
            composition.weights.theta.normal_(generator=torch.Generator().manual_seed(0))
    expected_groups = {"module": len(composition.sites), "layer": 2, "global": 1}[granularity]
    assert composition.weights.theta.shape == (expected_groups, 3)
    w = composition.effective_weights()
    if parameterisation == "softmax":
        torch.testing.assert_close(w.sum(-1), torch.ones(expected_groups))
    expected = naive_cat_logits(llama_dir, adapters, w, composition, ids)
    torch.testing.assert_close(logits(model, ids), expected, atol=1e-5, rtol=1e-5)


def test_export_reloads_in_stock_peft_and_merges(make_lora, llama_dir, ids, tmp_path):
    adapters = [
        load_adapter(make_lora("a", r=4, seed=1)),
        load_adapter(make_lora("b", r=2, alpha=4, seed=2, targets=["q_proj", "down_proj"])),
        load_adapter(make_lora("c", r=1, seed=3, targets=["v_proj"])),
        load_adapter(make_lora("d", r=3, seed=4, rank_pattern={"q_proj": 1})),
    ]
    model = AutoModelForCausalLM.from_pretrained(llama_dir)
    composition = compose_cat(model, adapters, seed=3)
    cat_logits = logits(model, ids)
    folded = fold_composition(composition)
    assert {f.rank for f in folded.values()} == {4 + 2 + 3}  # padded to the largest module rank
    out = tmp_path / "exported"
    out.mkdir()
    save_peft_adapter(folded, out, base_model=str(llama_dir), model=model)
    exported = load_adapter(out)
    assert exported.peft_config["r"] == exported.peft_config["lora_alpha"] == 9
    assert not exported.peft_config["rank_pattern"] and not exported.peft_config["use_rslora"]
    assert (cat_logits - peft_logits(llama_dir, out, ids)).abs().max() <= 1e-5

    base = remove_cat(composition)
    merged = merge_factors_into(base, folded)
    assert (cat_logits - logits(merged, ids)).abs().max() <= 1e-5


def test_gpt2_cat_export(gpt2_dir, tmp_path, ids):
    from tests.conftest import make_peft_lora

    adapters = [
        load_adapter(
            make_peft_lora(gpt2_dir, tmp_path / "a", targets=["c_attn", "c_fc"], fan_in_fan_out=True)
        ),
        load_adapter(
            make_peft_lora(gpt2_dir, tmp_path / "b", targets=["c_proj"], fan_in_fan_out=True, seed=1)
        ),
    ]
    model = AutoModelForCausalLM.from_pretrained(gpt2_dir)
    composition = compose_cat(model, adapters, seed=1)
    cat_logits = logits(model, ids)
    out = tmp_path / "export"
    out.mkdir()
    folded = fold_composition(composition)
    save_peft_adapter(folded, out, base_model=str(gpt2_dir), model=model, fan_in_fan_out=True)
    assert (cat_logits - peft_logits(gpt2_dir, out, ids)).abs().max() <= 1e-5
    merged = merge_factors_into(remove_cat(composition), folded)
    assert (cat_logits - logits(merged, ids)).abs().max() <= 1e-5


def test_only_cat_weights_get_gradients(make_lora, llama_dir, ids):
    adapters = [load_adapter(make_lora("a", seed=1)), load_adapter(make_lora("b", seed=2))]
    model = AutoModelForCausalLM.from_pretrained(llama_dir)
    composition = compose_cat(model, adapters)
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    assert trainable == ["lorasoup_cat_weights.theta"]
    model(input_ids=ids, labels=ids).loss.backward()
    assert composition.weights.theta.grad is not None and composition.weights.theta.grad.abs().sum() > 0
    assert all(p.grad is None for n, p in model.named_parameters() if n != "lorasoup_cat_weights.theta")
    layer = next(iter(composition.layers().values()))
    assert not layer.A.requires_grad and "A" in dict(layer.named_buffers())


@settings(max_examples=25, deadline=None)
@given(
    rank=st.integers(1, 6),
    extra=st.integers(0, 5),
    seed=st.integers(0, 10_000),
)
def test_fold_and_pad_preserve_the_product(rank, extra, seed):
    g = torch.Generator().manual_seed(seed)
    A, B, c = (
        torch.randn(rank, 5, generator=g),
        torch.randn(7, rank, generator=g),
        torch.randn(rank, generator=g),
    )
    from lorasoup.cat.fold import fold_factors

    A_before = A.clone()
    A2, B2 = pad_rank(*fold_factors(A, B, c), rank + extra)
    assert A2.shape == (rank + extra, 5)
    torch.testing.assert_close(B2 @ A2, B @ torch.diag(c) @ A)
    assert torch.equal(A, A_before)  # pure: the input is not scaled in place


@pytest.mark.parametrize("granularity", ["module", "layer"])
def test_gemma3_cat_export(gemma3_dir, tmp_path, ids, granularity):
    """Gemma-3 (issue 18's second architecture): q/k norms after the projections, scaled tied
    embeddings, sliding and global layers; the real-model study's seven targets."""
    from lorasoup.demo.settings import TARGETS
    from tests.conftest import make_peft_lora

    paths = [
        make_peft_lora(gemma3_dir, tmp_path / n, targets=TARGETS, seed=s) for n, s in (("a", 1), ("b", 2))
    ]
    model = AutoModelForCausalLM.from_pretrained(gemma3_dir)
    composition = compose_cat(model, [load_adapter(p) for p in paths], granularity=granularity, seed=1)
    assert len(composition.sites) == 2 * len(TARGETS)
    cat_logits = logits(model, ids)
    out = tmp_path / "export"
    out.mkdir()
    folded = fold_composition(composition)
    save_peft_adapter(folded, out, base_model=str(gemma3_dir), model=model)
    assert (cat_logits - peft_logits(gemma3_dir, out, ids)).abs().max() <= 1e-5
    merged = merge_factors_into(remove_cat(composition), folded)
    assert (cat_logits - logits(merged, ids)).abs().max() <= 1e-5
