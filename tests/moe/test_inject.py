"""MoE layers in a real model: block-level routing, generation with a KV cache, removal, errors."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from lorasoup.adapters import LoraAdapter, LoraFactors, load_adapter
from lorasoup.errors import CompatibilityError, ConfigError
from lorasoup.moe.inject import ROUTERS_ATTR, compose_moe, remove_moe


def perturb_routers(composition, seed=0, std=0.5):
    """Routers far from their near-uniform start, so gates differ clearly between tokens."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for router in composition.routers:
            router.weight.copy_(torch.randn(router.weight.shape, generator=generator) * std)
            router.bias.copy_(torch.randn(router.bias.shape, generator=generator))


@pytest.mark.parametrize("granularity", ["module", "layer"])
def test_only_routers_train_and_removal_restores_the_base(compose, llama_dir, granularity):
    composition = compose(granularity=granularity, top_k=1)
    trainable = {n for n, p in composition.model.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith(ROUTERS_ATTR) for n in trainable)
    assert len(composition.routers) == (10 if granularity == "module" else 2)
    ids = torch.tensor([[1, 5, 9, 14, 20]])
    base = AutoModelForCausalLM.from_pretrained(llama_dir).eval()
    perturb_routers(composition)
    with torch.no_grad():
        assert not torch.allclose(composition.model(ids).logits, base(ids).logits, atol=1e-4)
        restored = remove_moe(composition)
        torch.testing.assert_close(restored(ids).logits, base(ids).logits)
    assert not hasattr(restored, ROUTERS_ATTR)


def test_block_router_gates_every_module_of_its_block_from_the_block_input(compose, adapters):
    composition = compose(granularity="layer", top_k=2)
    perturb_routers(composition)
    model = composition.model
    seen = {}
    block = model.get_submodule("model.layers.1")
    # Registered after compose_moe's hooks, so it sees the same block input the router saw.
    block.register_forward_pre_hook(
        lambda m, args, kwargs: seen.update(block=kwargs.get("hidden_states", args[0] if args else None)),
        with_kwargs=True,
    )
    up = model.get_submodule("model.layers.1.mlp.up_proj")
    up.register_forward_hook(lambda m, args, out: seen.update(x=args[0], y=out))
    with torch.no_grad(), composition.recording() as records:
        model(torch.tensor([[1, 5, 9, 14, 20, 7]]))
    router = composition.routers[composition.group_names.index("model.layers.1")]
    h, x = seen["block"][0], seen["x"][0]  # (seq, hidden)
    factors = adapters[0].modules["model.layers.1.mlp.up_proj"]  # only "math" adapts up_proj
    for t in range(h.shape[0]):
        probs = torch.softmax(router.weight @ h[t] + router.bias, -1)  # K = 2 = top_k: soft
        expected = up.base(x[t]) + probs[0] * factors.scale * (factors.B @ (factors.A @ x[t]))
        torch.testing.assert_close(seen["y"][0, t], expected, atol=1e-5, rtol=1e-5)
    assert [r.group for r in records] == [0, 1]  # one router call per block, not per module


@pytest.mark.parametrize(("granularity", "top_k"), [("module", None), ("layer", 1)])
def test_generation_with_kv_cache_matches_generation_without(compose, granularity, top_k):
    composition = compose(granularity=granularity, top_k=top_k)
    perturb_routers(composition, seed=3)
    model = composition.model.eval()
    prompt = torch.tensor([[1, 5, 9, 14, 20], [1, 7, 3, 30, 2]])
    settings = {"max_new_tokens": 6, "do_sample": False, "pad_token_id": 0}
    with torch.no_grad():
        cached = model.generate(
            prompt, use_cache=True, output_logits=True, return_dict_in_generate=True, **settings
        )
        uncached = model.generate(
            prompt, use_cache=False, output_logits=True, return_dict_in_generate=True, **settings
        )
    assert torch.equal(cached.sequences, uncached.sequences)
    for a, b in zip(cached.logits, uncached.logits, strict=True):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def test_errors_are_one_line(compose, llama_dir, adapters):
    with pytest.raises(ConfigError, match="top_k=3 must be between 1 and the number of adapters"):
        compose(top_k=3)
    with pytest.raises(ConfigError, match="no gradient"):
        compose(top_k=1, renormalize=True)
    composition = compose()
    with pytest.raises(CompatibilityError, match="already holds MoE or CAT layers"):
        compose_moe(composition.model, adapters)
    with pytest.raises(CompatibilityError, match="at least one adapter"):
        compose_moe(AutoModelForCausalLM.from_pretrained(llama_dir), [])
    vocab = composition.model.config.vocab_size
    head = LoraAdapter(
        "head", "memory", {"lm_head": LoraFactors(torch.ones(2, 32), torch.ones(vocab, 2), 1.0)}, None
    )
    with pytest.raises(CompatibilityError, match="lm_head is not inside a numbered transformer block"):
        compose_moe(AutoModelForCausalLM.from_pretrained(llama_dir), [head], granularity="layer")


@pytest.mark.parametrize("granularity", ["module", "layer"])
def test_gpt2_conv1d_modules_and_blocks(gpt2_dir, tmp_path, granularity):
    from tests.conftest import make_peft_lora

    adapters = [
        load_adapter(make_peft_lora(gpt2_dir, tmp_path / name, targets=["c_attn", "c_fc"], seed=s), name=name)
        for s, name in enumerate(("a", "b"))
    ]
    base = AutoModelForCausalLM.from_pretrained(gpt2_dir).eval()
    composition = compose_moe(
        AutoModelForCausalLM.from_pretrained(gpt2_dir), adapters, granularity=granularity
    )
    assert composition.group_names[-1] == (
        "transformer.h.1" if granularity == "layer" else "transformer.h.1.mlp.c_fc"
    )
    perturb_routers(composition)
    model = composition.model.eval()
    prompt = torch.tensor([[1, 5, 9, 14]])
    with torch.no_grad():
        assert not torch.allclose(model(prompt).logits, base(prompt).logits, atol=1e-4)
        cached = model.generate(prompt, max_new_tokens=4, do_sample=False, use_cache=True, pad_token_id=0)
        uncached = model.generate(prompt, max_new_tokens=4, do_sample=False, use_cache=False, pad_token_id=0)
    assert torch.equal(cached, uncached)
