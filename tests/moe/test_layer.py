"""The gated layer against a per-token, per-adapter loop; top-k; the load-balancing loss by hand."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from lorasoup.moe.layer import GatedLoraLinear, TokenRouter, load_balancing_loss, route

RANKS = (2, 3, 1)


def reference_gates(logits: list[float], top_k: int | None, renormalize: bool) -> list[float]:
    """Gates of one token, written out: softmax, keep the k largest, optionally renormalise."""
    exps = [math.exp(v) for v in logits]
    probs = [e / sum(exps) for e in exps]
    if top_k is None:
        return probs
    keep = sorted(range(len(logits)), key=lambda i: (-logits[i], i))[:top_k]
    total = sum(exps[i] for i in keep) if renormalize else sum(exps)
    return [exps[i] / total if i in keep else 0.0 for i in range(len(logits))]


def build_layer(top_k, renormalize=False, shared=False, seed=0):
    generator = torch.Generator().manual_seed(seed)
    in_features, out_features, K = 8, 6, len(RANKS)
    base = nn.Linear(in_features, out_features)
    As = [torch.randn(r, in_features, generator=generator) for r in RANKS]
    Bs = [torch.randn(out_features, r, generator=generator) for r in RANKS]
    scales = torch.tensor([0.5, 2.0, 1.5])
    owner = torch.tensor([k for k, r in enumerate(RANKS) for _ in range(r)])
    router = TokenRouter(
        torch.randn(K, in_features, generator=generator),
        torch.randn(K, generator=generator),
        top_k,
        0,
        renormalize,
    )
    layer = GatedLoraLinear(base, torch.cat(As), torch.cat(Bs, dim=1), owner, scales, router, shared=shared)
    return layer, As, Bs, scales


@pytest.mark.parametrize(("top_k", "renormalize"), [(None, False), (1, False), (2, False), (2, True)])
def test_gated_layer_equals_a_per_token_per_adapter_loop(top_k, renormalize):
    layer, As, Bs, scales = build_layer(top_k, renormalize)
    x = torch.randn(2, 5, 8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        fused = layer(x)
        W, b = layer.router.weight, layer.router.bias
        for i in range(2):
            for t in range(5):
                token = x[i, t]
                logits = [float(W[k] @ token + b[k]) for k in range(len(RANKS))]
                gates = reference_gates(logits, top_k, renormalize)
                expected = layer.base(token)
                for k in range(len(RANKS)):
                    expected = expected + gates[k] * scales[k] * (Bs[k] @ (As[k] @ token))
                torch.testing.assert_close(fused[i, t], expected, atol=1e-5, rtol=1e-5)


def test_only_the_router_has_gradients():
    layer, *_ = build_layer(2)
    layer.base.requires_grad_(False)
    layer(torch.randn(3, 8)).sum().backward()
    assert layer.router.weight.grad is not None and layer.router.weight.grad.abs().sum() > 0
    assert layer.router.bias.grad is not None
    assert not any(p.requires_grad for p in layer.base.parameters())
    assert {name for name, _ in layer.named_parameters()} == {
        "base.weight",
        "base.bias",
    }  # router lives at the root


def test_top_1_without_renormalising_still_trains_the_router():
    """Switch-style top-1 gates are p_i, not 1: the model's loss reaches the router."""
    layer, *_ = build_layer(1)
    layer(torch.randn(4, 8)).pow(2).sum().backward()
    assert layer.router.weight.grad.abs().sum() > 0


@settings(max_examples=40, deadline=None)
@given(
    K=st.integers(2, 6),
    data=st.data(),
    seed=st.integers(0, 10_000),
    renormalize=st.booleans(),
)
def test_top_k_keeps_exactly_k_gates_per_token(K, data, seed, renormalize):
    k = data.draw(st.integers(1, K))
    logits = torch.randn(7, 3, K, generator=torch.Generator().manual_seed(seed)) * 3
    gates, chosen = route(logits, k, renormalize)
    assert ((gates != 0).sum(-1) == k).all()
    assert chosen.shape == (7, 3, k)
    assert torch.equal(torch.sort(chosen, -1).values, torch.sort(logits.topk(k, -1).indices, -1).values)
    if renormalize:
        torch.testing.assert_close(gates.sum(-1), torch.ones(7, 3))
    else:  # each kept gate is the full softmax probability
        probs = torch.softmax(logits, -1)
        torch.testing.assert_close(gates, torch.where(gates != 0, probs, torch.zeros_like(probs)))


def test_top_k_of_all_adapters_is_soft_gating():
    logits = torch.randn(5, 4)
    torch.testing.assert_close(route(logits, 4)[0], route(logits, None)[0])


def test_load_balancing_loss_top1_by_hand():
    probs = torch.tensor([[0.9, 0.1], [0.8, 0.2], [0.3, 0.7], [0.6, 0.4]])
    chosen = torch.tensor([[0], [0], [1], [0]])
    # f = (3/4, 1/4), P = (0.65, 0.35): 2 * (0.75 * 0.65 + 0.25 * 0.35) = 1.15
    loss = load_balancing_loss(probs.log(), chosen)
    assert loss.item() == pytest.approx(1.15, abs=1e-6)
    # without the last (padding) token: f = (2/3, 1/3), P = (2/3, 1/3): 2 * (4/9 + 1/9) = 10/9
    masked = load_balancing_loss(probs.log(), chosen, torch.tensor([1, 1, 1, 0]))
    assert masked.item() == pytest.approx(10 / 9, abs=1e-6)


def test_load_balancing_loss_top2_by_hand_and_uniform_is_one():
    probs = torch.tensor([[0.5, 0.3, 0.2], [0.1, 0.6, 0.3]])
    chosen = torch.tensor([[0, 1], [1, 2]])
    # slots: adapter 0 once, 1 twice, 2 once of 4 → f = (1/4, 1/2, 1/4); P = (0.3, 0.45, 0.25)
    # 3 * (0.075 + 0.225 + 0.0625) = 1.0875
    assert load_balancing_loss(probs.log(), chosen).item() == pytest.approx(1.0875, abs=1e-6)
    uniform = torch.zeros(4, 4)
    assert load_balancing_loss(uniform, torch.arange(4)[:, None]).item() == pytest.approx(1.0)


def test_load_balancing_gradient_flows_through_the_probabilities():
    logits = torch.randn(6, 3, requires_grad=True)
    load_balancing_loss(logits, logits.argmax(-1, keepdim=True)).backward()
    assert logits.grad is not None and logits.grad.abs().sum() > 0
