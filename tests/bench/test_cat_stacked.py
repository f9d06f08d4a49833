"""bench/cat_stacked.py, issue 23's experiments: CAT with each module's ``[W0; A]`` stacked, with
per-module θ leaves, or both, computes what the library's layer computes, costs no second copy of
``W0``, and gives the model back intact."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from lorasoup.adapters import load_adapter
from lorasoup.cat.inject import compose_cat, remove_cat

BENCH = Path(__file__).parents[2] / "bench"


def load_cat_stacked():
    spec = importlib.util.spec_from_file_location("cat_stacked", BENCH / "cat_stacked.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def loss_and_grads(model, trained, ids):
    """Loss, the trained tensors' gradients (as one (G, K) table) and the embeddings' gradient."""
    for parameter in trained:
        parameter.grad = None
    embeds = model.get_input_embeddings()(ids).detach().requires_grad_()
    loss = model(inputs_embeds=embeds, labels=ids).loss
    loss.backward()
    return loss.detach(), torch.stack([p.grad for p in trained]).reshape(-1, 2), embeds.grad


@pytest.mark.parametrize(("stacked", "leaves"), [(True, False), (False, True), (True, True)])
def test_experiments_equal_cat_and_give_the_model_back(make_lora, llama_dir, stacked, leaves) -> None:
    cat_stacked = load_cat_stacked()
    adapters = [load_adapter(make_lora("a", r=4, seed=1)), load_adapter(make_lora("b", r=2, seed=2))]
    model = AutoModelForCausalLM.from_pretrained(llama_dir)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    composition = compose_cat(model, adapters, granularity="module", parameterisation="softmax", seed=3)
    ids = torch.randint(4, 90, (2, 7), generator=torch.Generator().manual_seed(1))
    theta = composition.weights.theta
    theta0 = theta.detach().clone()
    plain = loss_and_grads(model, [theta], ids)

    trained = cat_stacked.stack(model, stacked=stacked, leaves=leaves) or [theta]
    assert len(trained) == (len(composition.sites) if leaves else 1)
    module = next(m for m in model.modules() if isinstance(m, cat_stacked.ExperimentalCatLinear))
    if stacked:  # W0 and A are views of the stacked matrix: no second copy
        assert module.layer.base.weight.data_ptr() == module.stacked.data_ptr()
        assert module.layer.A.data_ptr() == module.stacked[module.out :].data_ptr()
    for got, want in zip(loss_and_grads(model, trained, ids), plain, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)

    if leaves:  # a step on the leaves lands in θ when the model is given back
        with torch.no_grad():
            for leaf in trained:
                leaf.add_(0.5)
    cat_stacked.unstack(model)
    assert not any(isinstance(m, cat_stacked.ExperimentalCatLinear) for m in model.modules())
    if leaves:
        torch.testing.assert_close(composition.weights.theta.detach(), theta0 + 0.5)
    remove_cat(composition)
    after = dict(model.named_parameters())
    assert after.keys() == before.keys()
    for name, value in before.items():
        assert torch.equal(after[name], value), name
        assert after[name].untyped_storage().nbytes() == value.numel() * value.element_size()  # own storage
