"""The fast path: ``torch.compile`` of a CAT model computes what the eager layer computes."""

import torch
from transformers import AutoModelForCausalLM

from lorasoup.adapters import load_adapter
from lorasoup.cat.inject import compose_cat


def loss_and_grad(composition, ids):
    composition.weights.theta.grad = None
    loss = composition.model(input_ids=ids, labels=ids, use_cache=False).loss
    loss.backward()
    return loss.detach(), composition.weights.theta.grad.clone()


def test_compiled_cat_matches_eager_loss_and_gradient(make_lora, llama_dir):
    adapters = [load_adapter(make_lora("a", r=4, seed=1)), load_adapter(make_lora("b", r=2, seed=2))]
    composition = compose_cat(AutoModelForCausalLM.from_pretrained(llama_dir), adapters, seed=4)
    ids = torch.randint(4, 90, (2, 9), generator=torch.Generator().manual_seed(0))

    def loss_and_grad(model):
        composition.weights.theta.grad = None
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        return loss.detach(), composition.weights.theta.grad.clone()

    eager_loss, eager_grad = loss_and_grad(composition.model)
    compiled = torch.compile(composition.model, fullgraph=True)
    compiled_loss, compiled_grad = loss_and_grad(compiled)
    torch.testing.assert_close(compiled_loss, eager_loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(compiled_grad, eager_grad, rtol=1e-4, atol=1e-7)
    assert eager_grad.abs().sum() > 0


def test_decoder_layers_share_one_compiled_graph(tokenizer, tmp_path):
    """The group is read through an index buffer, so compiling each decoder layer on its own (regional
    compilation) traces one graph for all of them instead of one per layer: two in all, since the
    first layer's input needs no gradient and the others' do."""
    from torch._dynamo.utils import counters

    from tests.conftest import build_llama, make_peft_lora

    model = build_llama(len(tokenizer))
    model.config.num_hidden_layers = 4
    model = type(model)(model.config)
    model.save_pretrained(tmp_path / "base")
    adapters = [
        load_adapter(make_peft_lora(tmp_path / "base", tmp_path / name, r=r, seed=seed))
        for name, r, seed in (("a", 4, 1), ("b", 2, 2))
    ]
    composition = compose_cat(AutoModelForCausalLM.from_pretrained(tmp_path / "base"), adapters, seed=4)
    ids = torch.randint(4, 90, (2, 9), generator=torch.Generator().manual_seed(0))
    eager = loss_and_grad(composition, ids)
    layers = composition.model.model.layers
    torch._dynamo.reset()
    counters.clear()
    originals = list(layers)
    try:
        for i, layer in enumerate(originals):
            layers[i] = torch.compile(layer)
        compiled = loss_and_grad(composition, ids)
    finally:
        for i, layer in enumerate(originals):
            layers[i] = layer
    assert len(layers) == 4 and counters["stats"]["unique_graphs"] == 2
    torch.testing.assert_close(compiled[0], eager[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(compiled[1], eager[1], rtol=1e-4, atol=1e-7)
