"""The fast path: ``torch.compile`` of a CAT model computes what the eager layer computes."""

import torch
from transformers import AutoModelForCausalLM

from lorasoup.adapters import load_adapter
from lorasoup.cat.inject import compose_cat


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
