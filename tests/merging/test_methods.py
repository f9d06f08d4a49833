"""Merge methods: the maths of each family member, on random factors and on hand-made cases."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lorasoup.adapters import LoraFactors
from lorasoup.lowrank import dense_lowrank
from lorasoup.merging import MERGE_METHODS, MergeParams
from lorasoup.merging.delta import RECIPES, merge_tasks
from lorasoup.merging.ops import disjoint_mean, elect_sign, keep_top_magnitude, sign_agreement
from lorasoup.merging.rowwise import merge_rowwise
from tests.conftest import on_gpu

DELTA_METHODS = [n for n in MERGE_METHODS if MERGE_METHODS.get(n).space == "delta"]


def _factors(k: int, out: int, inn: int, ranks: list[int], seed: int) -> list[LoraFactors]:
    g = torch.Generator().manual_seed(seed)
    return [
        LoraFactors(A=torch.randn(r, inn, generator=g), B=torch.randn(out, r, generator=g), scale=0.5 + i)
        for i, r in zip(range(k), ranks, strict=True)
    ]


def _merge(name: str, factors, weights, seed: int = 0, **params) -> torch.Tensor:
    method = MERGE_METHODS.get(name)
    result = method.merge(
        factors, torch.tensor(weights), MergeParams(**params), torch.Generator().manual_seed(seed)
    )
    return result.B @ result.A


cases = st.tuples(st.integers(1, 3), st.integers(2, 12), st.integers(2, 12), st.integers(0, 2**16))


@settings(max_examples=40, deadline=None)
@given(cases, st.lists(st.floats(-2, 2), min_size=3, max_size=3))
def test_linear_is_the_exact_weighted_sum_of_updates(case, weights) -> None:
    k, out, inn, seed = case
    factors = _factors(k, out, inn, [1 + (seed + i) % 4 for i in range(k)], seed)
    expected = sum(w * f.delta() for w, f in zip(weights[:k], factors, strict=True))
    assert torch.allclose(_merge("linear", factors, weights[:k]), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", [*DELTA_METHODS, "linear_factor"])
def test_weight_one_on_one_adapter_returns_it(name: str) -> None:
    factors = _factors(2, 10, 8, [3, 3], seed=4)
    params = {"density": 1.0} if MERGE_METHODS.get(name).uses_density else {}
    if name in ("ties", "dare_linear", "dare_ties", "magnitude_prune", "svd"):
        params["rank"] = 3
    merged = _merge(name, [factors[0], None], [1.0, 0.0], **params)
    assert torch.allclose(merged, factors[0].delta(), atol=1e-4)
    merged = _merge(name, factors, [1.0, 0.0], **params)
    assert torch.allclose(merged, factors[0].delta(), atol=1e-4)


@settings(max_examples=25, deadline=None)
@given(cases)
def test_dare_at_density_one_equals_linear(case) -> None:
    k, out, inn, seed = case
    factors = _factors(k, out, inn, [2] * k, seed)
    weights = [0.7, -0.3, 1.1][:k]
    linear = _merge("linear", factors, weights)
    dare = _merge("dare_linear", factors, weights, density=1.0, rank=2 * k, svd="exact")
    assert torch.allclose(dare, linear, atol=1e-4)


def test_ties_on_a_hand_made_case_follows_trim_elect_merge() -> None:
    # Two task vectors of 4 entries; density 0.5 keeps the 2 largest |values| of each.
    t1 = torch.tensor([3.0, -1.0, 0.5, -4.0])  # trimmed: [3, 0, 0, -4]
    t2 = torch.tensor([-2.0, 0.1, 1.0, 5.0])  # trimmed: [-2, 0, 0, 5]
    trimmed = torch.stack([keep_top_magnitude(t1, 0.5), keep_top_magnitude(t2, 0.5)])
    assert trimmed.tolist() == [[3.0, 0.0, 0.0, -4.0], [-2.0, 0.0, 0.0, 5.0]]
    # Elect (total mass): entry 0: 3-2=1>0 → +; entry 3: -4+5=1>0 → +; entries 1,2 tie at 0 → +.
    sign = elect_sign(trimmed, "total")
    assert sign.tolist() == [1.0, 1.0, 1.0, 1.0]
    # Disjoint mean: entry 0 keeps only 3; entry 3 keeps only 5; others have no agreeing value.
    merged = disjoint_mean(trimmed, sign_agreement(trimmed, sign))
    assert merged.tolist() == [3.0, 0.0, 0.0, 5.0]
    end_to_end = merge_tasks(
        torch.stack([t1, t2]),
        torch.ones(2),
        RECIPES["ties"],
        density=0.5,
        sign_method="total",
        generator=torch.Generator(),
    )
    assert end_to_end.tolist() == [3.0, 0.0, 0.0, 5.0]


def test_frequency_sign_counts_votes_not_mass() -> None:
    tasks = torch.tensor([[10.0], [-1.0], [-1.0]])
    assert elect_sign(tasks, "total").item() == 1.0
    assert elect_sign(tasks, "frequency").item() == -1.0
    merged = disjoint_mean(tasks, sign_agreement(tasks, elect_sign(tasks, "frequency")))
    assert merged.item() == -1.0


def test_negative_weight_flips_a_tasks_vote_in_delta_space() -> None:
    tasks = torch.tensor([[1.0], [2.0]])
    merged = merge_tasks(
        tasks,
        torch.tensor([1.0, -1.0]),
        RECIPES["ties"],
        density=1.0,
        sign_method="total",
        generator=torch.Generator(),
    )
    assert merged.item() == -2.0  # weighted votes: +1 and -2 → sign -, only the subtracted task agrees


def test_magnitude_prune_keeps_exactly_the_largest_entries() -> None:
    t = torch.tensor([[0.1, -5.0, 2.0], [-3.0, 0.2, 0.3]])
    kept = keep_top_magnitude(t, 0.5)
    assert kept.tolist() == [[0.0, -5.0, 2.0], [-3.0, 0.0, 0.0]]
    assert t.tolist()[0][0] == pytest.approx(0.1)  # input untouched


@pytest.mark.parametrize("name", [n for n in MERGE_METHODS if MERGE_METHODS.get(n).random])
def test_same_seed_same_result_other_seed_differs(name: str) -> None:
    factors = _factors(2, 16, 12, [4, 4], seed=9)
    params = {"density": 0.5}
    first = _merge(name, factors, [1.0, 1.0], seed=3, **params)
    again = _merge(name, factors, [1.0, 1.0], seed=3, **params)
    other = _merge(name, factors, [1.0, 1.0], seed=4, **params)
    assert torch.equal(first, again)
    assert not torch.allclose(first, other)


def test_random_methods_leave_the_global_rng_alone() -> None:
    factors = _factors(2, 8, 8, [2, 2], seed=1)
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    _merge("dare_ties", factors, [1.0, 1.0], density=0.3)
    assert torch.equal(torch.rand(1), before)


def test_factor_space_requires_one_rank() -> None:
    factors = _factors(2, 8, 8, [2, 3], seed=1)
    with pytest.raises(ValueError, match="one rank"):
        _merge("ties_factor", factors, [1.0, 1.0], density=0.5)


def test_svd_defaults_to_the_largest_input_rank_and_is_the_best_approximation() -> None:
    factors = _factors(2, 20, 16, [3, 3], seed=2)
    method = MERGE_METHODS.get("svd")
    result = method.merge(factors, torch.tensor([1.0, 1.0]), MergeParams(), torch.Generator())
    assert result.A.shape[0] == 3
    delta = factors[0].delta() + factors[1].delta()
    S = torch.linalg.svdvals(delta.double())
    error = float((delta - result.B @ result.A).double().square().sum())
    assert error == pytest.approx(float(S[3:].square().sum()), rel=1e-4)
    assert result.discarded_energy == pytest.approx(float(S[3:].square().sum() / S.square().sum()), rel=1e-4)


@on_gpu
@pytest.mark.parametrize("name", ["linear", "svd"])
def test_exact_delta_methods_run_on_cuda_like_on_cpu(name: str) -> None:
    factors = _factors(2, 24, 20, [3, 3], seed=6)
    params = MergeParams(rank=4)
    cuda = [type(f)(f.A.cuda(), f.B.cuda(), f.scale) for f in factors]
    method = MERGE_METHODS.get(name)
    gpu = method.merge(cuda, torch.tensor([0.6, 0.4]).cuda(), params, torch.Generator("cuda").manual_seed(0))
    cpu = method.merge(factors, torch.tensor([0.6, 0.4]), params, torch.Generator().manual_seed(0))
    assert torch.allclose((gpu.B @ gpu.A).cpu(), cpu.B @ cpu.A, atol=1e-4)


@on_gpu
@pytest.mark.parametrize("name", [n for n in RECIPES if RECIPES[n].sparsify != "none"])
def test_sparsifying_methods_run_on_cuda_like_on_cpu(name: str) -> None:
    """The merged ΔW is the CPU's (the GPU kernels against the torch path); its low-rank factors are
    the CPU's in full fp32 and within TF32's rounding with the range finder on TF32 (the default)."""
    factors = _factors(2, 24, 20, [3, 3], seed=6)
    recipe = RECIPES[name]
    options = dict(
        sparsify=recipe.sparsify,
        consensus=recipe.consensus,
        density=1.0 if recipe.sparsify == "random" else 0.5,
        sign_method="total",
    )
    cuda = [type(f)(f.A.cuda(), f.B.cuda(), f.scale) for f in factors]
    weights = torch.tensor([0.6, 0.4])
    on_gpu_ = merge_rowwise(cuda, weights.cuda(), generator=torch.Generator("cuda").manual_seed(0), **options)
    on_cpu = merge_rowwise(factors, weights, generator=torch.Generator().manual_seed(0), **options)
    torch.testing.assert_close(on_gpu_.cpu(), on_cpu, atol=1e-5, rtol=1e-5)

    def product(delta: torch.Tensor, *, tf32: bool) -> torch.Tensor:
        generator = torch.Generator(delta.device).manual_seed(0)
        low = dense_lowrank(delta, rank=6, mode="randomized", generator=generator, tf32=tf32)
        return (low.B @ low.A).cpu()

    expected = product(on_cpu, tf32=False)
    torch.testing.assert_close(product(on_gpu_, tf32=False), expected, atol=1e-4, rtol=1e-4)
    relative = (product(on_gpu_, tf32=True) - expected).norm() / expected.norm()
    assert relative < 5e-3  # TF32 keeps 10 mantissa bits: ~5e-4 per product, amplified by the spectral gap

    method = MERGE_METHODS.get(name)
    params = MergeParams(density=options["density"], rank=6, svd="randomized")
    gpu = method.merge(cuda, weights.cuda(), params, torch.Generator("cuda").manual_seed(0))
    assert ((gpu.B @ gpu.A).cpu() - expected).norm() / expected.norm() < 5e-3


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(-3, 3), min_size=1, max_size=30), st.floats(0.01, 0.99))
def test_magnitude_trim_keeps_exactly_k_of_the_largest_even_with_ties(values, density) -> None:
    """Small integers make many ties at the threshold: still exactly the k largest magnitudes survive
    (at most k non-zeros), each unchanged."""
    t = torch.tensor(values, dtype=torch.float32)
    k = max(1, int(density * t.numel()))
    kept = keep_top_magnitude(t, density)
    assert torch.all((kept == 0) | (kept == t))
    assert int((kept != 0).sum()) <= k
    largest = torch.sort(t.abs(), descending=True).values[:k]
    assert torch.equal(torch.sort(kept.abs(), descending=True).values[:k], largest)
