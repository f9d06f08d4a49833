"""Core-space merges against dense references of the same definitions, and their memory footprint."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from peft import PeftModel
from torch.overrides import TorchFunctionMode
from transformers import AutoModelForCausalLM
from typer.testing import CliRunner

from lorasoup.adapters import LoraFactors, load_adapter
from lorasoup.cli import app
from lorasoup.merging import MERGE_METHODS, MergeParams
from lorasoup.merging.core_space import core_space
from lorasoup.merging.delta import RECIPES, merge_tasks
from lorasoup.merging.run import run_merge
from tests.conftest import on_gpu

CORE_METHODS = [n for n in MERGE_METHODS if MERGE_METHODS.get(n).space == "core"]
PRESETS = {"core_ties": "ties", "core_dare": "dare_linear", "core_dare_ties": "dare_ties"}


def make_factors(out: int, inn: int, ranks: list[int], seed: int, dtype=torch.float64) -> list[LoraFactors]:
    g = torch.Generator().manual_seed(seed)
    return [
        LoraFactors(
            A=torch.randn(r, inn, generator=g).to(dtype),
            B=torch.randn(out, r, generator=g).to(dtype),
            scale=0.5 + i,
        )
        for i, r in enumerate(ranks)
    ]


def merged_update(name: str, factors, weights, seed: int = 0, **params) -> torch.Tensor:
    result = MERGE_METHODS.get(name).merge(
        factors,
        torch.tensor(weights, dtype=torch.float64),
        MergeParams(**params),
        torch.Generator().manual_seed(seed),
    )
    return result.B.double() @ result.A.double()


def dense_bases(factors: list[LoraFactors]) -> tuple[torch.Tensor, torch.Tensor]:
    """The shared bases by a dense SVD of the stacked factors, computed apart from the library."""
    U = torch.linalg.svd(torch.cat([f.B.double() for f in factors], 1), full_matrices=False).U
    V = torch.linalg.svd(torch.cat([f.A.double() for f in factors], 0), full_matrices=False).Vh.T
    return U, V


shapes = st.tuples(
    st.integers(2, 14),  # out
    st.integers(2, 14),  # in
    st.lists(st.integers(1, 5), min_size=1, max_size=4),  # mixed ranks, K = len
    st.integers(0, 2**16),
)
weight_lists = st.lists(st.floats(-2, 2).filter(lambda w: abs(w) > 1e-3), min_size=4, max_size=4)


@settings(max_examples=40, deadline=None)
@given(shapes, weight_lists)
def test_core_linear_is_delta_space_linear(shape, weights) -> None:
    out, inn, ranks, seed = shape
    w = weights[: len(ranks)]
    for dtype, tol in ((torch.float64, 1e-10), (torch.float32, 1e-6)):
        factors = make_factors(out, inn, ranks, seed, dtype)
        expected = sum(wi * f.delta(torch.float64) for wi, f in zip(w, factors, strict=True))
        scale = max(1.0, float(expected.abs().max()))
        core = merged_update("core_linear", factors, w)
        assert float((core - expected).abs().max()) <= tol * scale
        linear = merged_update("linear", factors, w)
        assert float((core - linear).abs().max()) <= max(tol, 1e-6) * scale


@settings(max_examples=40, deadline=None)
@given(shapes)
def test_cores_hold_every_update_exactly(shape) -> None:
    out, inn, ranks, seed = shape
    factors = make_factors(out, inn, ranks, seed)
    space = core_space([factors])  # a batch of one module
    assert space.cores.shape == (1, len(ranks), min(out, sum(ranks)), min(inn, sum(ranks)))
    for f, core in zip(factors, space.cores[0], strict=True):
        torch.testing.assert_close(
            space.U[0] @ core @ space.V[0].T, f.delta(torch.float64), atol=1e-10, rtol=0
        )


@pytest.mark.parametrize("name", list(PRESETS))
@settings(max_examples=30, deadline=None)
@given(shape=shapes, weights=weight_lists, density=st.sampled_from([0.2, 0.5, 0.9, 1.0]))
def test_core_presets_are_the_presets_on_core_entries(name, shape, weights, density) -> None:
    """The dense reference: project each dense ΔW_i onto bases found by a dense SVD, apply the
    ΔW-space preset's definition (the same ``merge_tasks``) to those entries, map back densely."""
    out, inn, ranks, seed = shape
    factors = make_factors(out, inn, ranks, seed)
    w = weights[: len(ranks)]
    U, V = dense_bases(factors)
    entries = torch.stack([U.T @ f.delta(torch.float64) @ V for f in factors])
    merged = merge_tasks(
        entries,
        torch.tensor(w, dtype=torch.float64),
        RECIPES[PRESETS[name]],
        density=density,
        sign_method="total",
        generator=torch.Generator().manual_seed(7),
    )
    expected = U @ merged @ V.T
    got = merged_update(name, factors, w, seed=7, density=density)
    torch.testing.assert_close(got, expected, atol=1e-9, rtol=1e-9)


def test_core_ties_is_not_delta_space_ties() -> None:
    """Same definition, other basis: trimming core entries is not trimming ΔW entries."""
    factors = make_factors(16, 12, [3, 4], seed=3)
    core = merged_update("core_ties", factors, [1.0, 1.0], density=0.3)
    delta = merged_update("ties", factors, [1.0, 1.0], density=0.3, rank=7, svd="exact")
    assert (core - delta).norm() > 1e-3 * delta.norm()


@pytest.mark.parametrize("name", [*CORE_METHODS, "tsv"])
def test_weight_one_on_one_adapter_returns_it(name) -> None:
    factors = make_factors(10, 8, [3, 2], seed=4)
    params = {"density": 1.0} if MERGE_METHODS.get(name).uses_density else {}
    for case in ([factors[0], None], factors):  # absent, or present with weight 0
        torch.testing.assert_close(
            merged_update(name, case, [1.0, 0.0], **params),
            factors[0].delta(torch.float64),
            atol=1e-10,
            rtol=0,
        )


@pytest.mark.parametrize("name", [*CORE_METHODS, "tsv"])
def test_all_weights_zero_is_a_zero_update(name) -> None:
    factors = make_factors(6, 5, [2, 1], seed=1)
    params = {"density": 0.5} if MERGE_METHODS.get(name).uses_density else {}
    assert merged_update(name, factors, [0.0, 0.0], **params).abs().max() == 0


@pytest.mark.parametrize("name", CORE_METHODS)
def test_rank_truncates_exactly(name) -> None:
    """``rank`` keeps the top singular triplets of the merged update (Eckart–Young), reporting the loss."""
    factors = make_factors(14, 11, [3, 4], seed=5)
    params = {"density": 0.6} if MERGE_METHODS.get(name).uses_density else {}
    full = merged_update(name, factors, [0.8, 0.5], seed=1, **params)
    result = MERGE_METHODS.get(name).merge(
        factors, torch.tensor([0.8, 0.5]), MergeParams(rank=3, **params), torch.Generator().manual_seed(1)
    )
    assert result.A.shape[0] == 3
    S = torch.linalg.svdvals(full)
    error = (full - result.B.double() @ result.A.double()).square().sum()
    assert float(error) == pytest.approx(float(S[3:].square().sum()), rel=1e-6, abs=1e-12)
    assert result.discarded_energy == pytest.approx(float(S[3:].square().sum() / S.square().sum()), rel=1e-6)


class LargestTensor(TorchFunctionMode):
    """Records the largest number of elements of any tensor a torch call returns."""

    def __init__(self) -> None:
        super().__init__()
        self.largest = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        result = func(*args, **(kwargs or {}))
        for item in result if isinstance(result, (tuple, list)) else (result,):
            if isinstance(item, torch.Tensor):
                self.largest = max(self.largest, item.numel())
        return result


@pytest.mark.parametrize("name", [*CORE_METHODS, "tsv"])
@pytest.mark.parametrize("rank", [None, 5])
def test_never_builds_an_out_by_in_tensor(name, rank) -> None:
    out, inn, ranks = 1536, 1024, [8, 16]
    factors = make_factors(out, inn, ranks, seed=2, dtype=torch.float32)
    params = MergeParams(density=0.5 if MERGE_METHODS.get(name).uses_density else 1.0, rank=rank)
    with LargestTensor() as probe:
        MERGE_METHODS.get(name).merge(factors, torch.tensor([0.7, 0.6]), params, torch.Generator())
    assert probe.largest <= max(out, inn) * sum(ranks)  # a thin stack, never out × in


def test_the_probe_sees_a_dense_merge() -> None:
    factors = make_factors(96, 64, [2, 3], seed=2, dtype=torch.float32)
    with LargestTensor() as probe:
        MERGE_METHODS.get("ties").merge(
            factors, torch.tensor([1.0, 1.0]), MergeParams(density=0.5, rank=2), torch.Generator()
        )
    assert probe.largest >= 96 * 64


@pytest.mark.parametrize("name", [*CORE_METHODS, "tsv"])
def test_listed_with_its_paper(name) -> None:
    result = CliRunner().invoke(app, ["merge", "--list"], terminal_width=400)
    assert result.exit_code == 0
    assert name in result.output
    assert "arxiv.org" in MERGE_METHODS.get(name).reference


def test_core_linear_reloads_in_stock_peft_as_the_weighted_sum(make_lora, llama_dir: Path, tmp_path) -> None:
    """Export → ``PeftModel.from_pretrained`` → the logits of ``W0 + Σ w_i ΔW_i`` (built densely here)."""
    from lorasoup.config import load_config
    from lorasoup.merging.config import MergeRunConfig

    paths = [make_lora("math", r=4, seed=1), make_lora("code", r=2, seed=2, targets=["q_proj", "v_proj"])]
    weights = [0.8, -0.6]
    config = {
        "method": "core_linear",
        "adapters": [{"path": str(p), "weight": w} for p, w in zip(paths, weights, strict=True)],
        "output": str(tmp_path / "out"),
        "device": "cpu",
    }
    run_merge(load_config(MergeRunConfig, base=config))
    ids = torch.tensor([[1, 5, 9, 14, 20, 33]])
    with torch.no_grad():
        peft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(llama_dir), tmp_path / "out")
        got = peft(ids).logits
        model = AutoModelForCausalLM.from_pretrained(llama_dir)
        for w, path in zip(weights, paths, strict=True):
            for module, factors in load_adapter(path).modules.items():
                model.get_submodule(module).weight += w * factors.delta()
        expected = model(ids).logits
    assert float((got - expected).abs().max()) <= 1e-5


@on_gpu
@pytest.mark.parametrize("name", [*CORE_METHODS, "tsv"])
def test_runs_on_cuda_like_on_cpu(name) -> None:
    """On CUDA factors the result is the CPU's (DARE's draws excepted: CUDA's generator draws others)."""
    factors = make_factors(48, 40, [3, 5], seed=6, dtype=torch.float32)
    cuda = [LoraFactors(A=f.A.cuda(), B=f.B.cuda(), scale=f.scale) for f in factors]
    method = MERGE_METHODS.get(name)
    params = MergeParams(density=0.5 if method.uses_density else 1.0, rank=6)
    weights = torch.tensor([0.7, -0.4])  # on the host, as the runner passes them
    gpu = method.merge(cuda, weights, params, torch.Generator("cuda").manual_seed(0))
    assert gpu.A.is_cuda and gpu.B.is_cuda
    if method.random:
        return
    cpu = method.merge(factors, weights, params, torch.Generator().manual_seed(0))
    torch.testing.assert_close((gpu.B @ gpu.A).cpu(), cpu.B @ cpu.A, atol=1e-5, rtol=1e-5)
