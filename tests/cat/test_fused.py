"""The fused CAT path (one autograd function per module) computes what the composition of plain ops
computes: values, input gradients and coefficient gradients; and every decoder layer shares one graph."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from transformers import AutoModelForCausalLM
from transformers.pytorch_utils import Conv1D

from lorasoup.adapters import load_adapter
from lorasoup.cat.inject import compose_cat
from lorasoup.cat.layer import CatLinear, FusedCatLinear


def plain(x, weight, bias, A, B, c):
    return torch.nn.functional.linear(x, weight, bias) + torch.nn.functional.linear(
        torch.nn.functional.linear(x, A) * c, B
    )


@settings(max_examples=20, deadline=None)
@given(
    rows=st.integers(1, 5),
    extra=st.integers(1, 3),
    size_in=st.integers(1, 7),
    size_out=st.integers(1, 7),
    rank=st.integers(1, 6),
    bias=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_fused_function_matches_plain_ops_and_passes_gradcheck(
    rows, extra, size_in, size_out, rank, bias, seed
):
    g = torch.Generator().manual_seed(seed)

    def rand(*shape, grad=False):
        return torch.randn(*shape, generator=g, dtype=torch.float64).requires_grad_(grad)

    x, c = rand(rows, extra, size_in, grad=True), rand(rank, grad=True)
    weight, A, B = rand(size_out, size_in), rand(rank, size_in), rand(size_out, rank)
    b = rand(size_out) if bias else None
    fused = FusedCatLinear.apply(x, weight, b, A, B, c)
    reference = plain(x, weight, b, A, B, c)
    torch.testing.assert_close(fused, reference)
    upstream = rand(*reference.shape)
    got = torch.autograd.grad(fused, (x, c), upstream)
    want = torch.autograd.grad(reference, (x, c), upstream)
    for a, e in zip(got, want, strict=True):
        torch.testing.assert_close(a, e)
    assert torch.autograd.gradcheck(lambda x, c: FusedCatLinear.apply(x, weight, b, A, B, c), (x, c))


def test_only_the_coefficients_may_need_a_gradient():
    x = torch.randn(3, 4, dtype=torch.float64)  # no input gradient: the first layer's case
    c = torch.randn(2, dtype=torch.float64, requires_grad=True)
    weight, A, B = torch.randn(5, 4).double(), torch.randn(2, 4).double(), torch.randn(5, 2).double()
    (grad_c,) = torch.autograd.grad(FusedCatLinear.apply(x, weight, None, A, B, c).sum(), c)
    (want,) = torch.autograd.grad(plain(x, weight, None, A, B, c).sum(), c)
    torch.testing.assert_close(grad_c, want)


def loss_and_grad(composition, ids):
    composition.weights.theta.grad = None
    loss = composition.model(input_ids=ids, labels=ids, use_cache=False).loss
    loss.backward()
    return loss.detach(), composition.weights.theta.grad.clone()


@pytest.mark.parametrize("granularity", ["module", "layer"])
def test_fused_model_equals_unfused_model(make_lora, llama_dir, granularity):
    adapters = [load_adapter(make_lora("a", r=4, seed=1)), load_adapter(make_lora("b", r=2, seed=2))]
    composition = compose_cat(
        AutoModelForCausalLM.from_pretrained(llama_dir, dtype=torch.float64),
        adapters,
        seed=4,
        granularity=granularity,
    )
    layers = [m for m in composition.model.modules() if isinstance(m, CatLinear)]
    assert layers and all(layer.fused for layer in layers)  # Llama's projections are plain nn.Linear
    ids = torch.randint(4, 90, (2, 9), generator=torch.Generator().manual_seed(0))
    fused = loss_and_grad(composition, ids)
    for layer in layers:
        layer.fused = False
    unfused = loss_and_grad(composition, ids)
    torch.testing.assert_close(fused[0], unfused[0])
    torch.testing.assert_close(fused[1], unfused[1])
    assert unfused[1].abs().sum() > 0


def test_conv1d_base_is_fused_and_dropout_is_not():
    from lorasoup.cat.layer import CatWeights

    weights = CatWeights(torch.zeros(1, 2), "softmax")
    owner, scales = torch.tensor([0, 0, 1]), torch.tensor([2.0, 0.5])
    A, B = torch.randn(3, 4), torch.randn(6, 3)
    conv = Conv1D(6, 4)
    fused = CatLinear(conv, A, B, owner, scales, weights, group=0)
    dropped = CatLinear(nn.Linear(4, 6), A, B, owner, scales, weights, group=0, dropout=0.1)
    assert fused.fused and not dropped.fused
    x = torch.randn(2, 3, 4)
    c = torch.tensor([1.0, 1.0, 0.25])  # softmax(0, 0) = 1/2 each, times the scales
    torch.testing.assert_close(fused(x), conv(x) + (x @ A.t() * c) @ B.t())


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
