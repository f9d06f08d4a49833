"""The captured-graph merge gives the eager merge's factors, module after module."""

from __future__ import annotations

import pytest
import torch

from lorasoup.adapters import LoraFactors
from lorasoup.merging import MERGE_METHODS, MergeParams, rowwise
from lorasoup.merging.delta import RECIPES, merge_delta
from lorasoup.merging.graphed import GraphedDeltaMerge
from lorasoup.merging.run import module_generator
from tests.conftest import on_gpu

PRESETS = [name for name in RECIPES if RECIPES[name].sparsify != "none"]
SHAPES = [(96, 64), (64, 96), (64, 64)]  # like a 7B model's up, down and attention projections


@pytest.fixture
def small_modules(monkeypatch):
    """Sampled cuts and several row blocks on modules of a few thousand entries."""
    monkeypatch.setattr(rowwise, "SAMPLE_SIZE", 256)
    monkeypatch.setattr(rowwise, "BLOCK_ELEMENTS", 2048)


def _module(shape: tuple[int, int], seed: int, device: str, dtype=torch.float32) -> list[LoraFactors]:
    g = torch.Generator().manual_seed(seed)
    out, inn = shape
    return [
        LoraFactors(
            A=torch.randn(rank, inn, generator=g).to(device, dtype),
            B=torch.randn(out, rank, generator=g).to(device, dtype),
            scale=2.0 / (i + 1),
        )
        for i, rank in enumerate((4, 6))
    ]


def _run_layers(name: str, device: str, layers: int, **options):
    """Both paths over ``layers`` layers of the three shapes: [(graphed, eager)] and the merger."""
    merger = GraphedDeltaMerge(RECIPES[name], torch.device(device), **options)
    params = MergeParams(density=0.4, rank=8, svd="randomized")
    weights = torch.tensor([0.7, -0.5])
    eager, graphed, order = {}, {}, []
    for layer in range(layers):
        for j, shape in enumerate(SHAPES):
            path = f"layers.{layer}.{j}"
            factors = _module(shape, seed=10 * layer + j, device=device)
            eager[path] = merge_delta(
                RECIPES[name], factors, weights, params, module_generator(3, path, torch.device(device))
            )
            finished = merger.submit(
                path, factors, weights, params, module_generator(3, path, torch.device(device))
            )
            graphed.update(finished)
            order += [done for done, _ in finished]
    finished = merger.finish()
    graphed.update(finished)
    order += [done for done, _ in finished]
    assert order == list(eager)  # every module once, in the order submitted
    return [(graphed[path], eager[path]) for path in eager], merger


@pytest.mark.parametrize("name", PRESETS)
def test_the_split_merge_is_the_eager_merge(name: str, small_modules) -> None:
    """Device part, one read of the packet, host finish: the eager path's factors exactly (CPU)."""
    pairs, merger = _run_layers(name, "cpu", layers=2, capture=False)
    for graphed, eager in pairs:
        assert torch.equal(graphed.A, eager.A) and torch.equal(graphed.B, eager.B)
        assert graphed.discarded_energy == eager.discarded_energy
    assert merger.stats == {"replayed": 0, "eager": 0, "redone": 0}


def test_an_unsound_module_is_redone_eagerly(small_modules, monkeypatch) -> None:
    """A missed magnitude bracket shows in the packet, and the module is merged the eager way."""

    def wrong(task, k, sample_size):  # far below the true cut: too many entries above it
        zero = torch.zeros(())
        return zero, zero, 0.01

    factors = _module(SHAPES[0], seed=1, device="cpu")
    params = MergeParams(density=0.3, rank=8, svd="randomized")
    expected = merge_delta(RECIPES["ties"], factors, torch.ones(2), params, torch.Generator().manual_seed(0))
    monkeypatch.setattr(rowwise, "_bracket", wrong)
    merger = GraphedDeltaMerge(RECIPES["ties"], torch.device("cpu"), capture=False)
    [(name, result)] = merger.submit("m", factors, torch.ones(2), params, torch.Generator().manual_seed(0))
    assert name == "m" and merger.stats["redone"] == 1 and merger.finish() == []
    assert torch.equal(result.A, expected.A) and torch.equal(result.B, expected.B)


def test_delta_presets_stream_through_graphs_and_others_do_not() -> None:
    """Besides them only the core-space methods stream (batched: ``merging.core_batched``)."""
    streaming = {name for name in MERGE_METHODS if MERGE_METHODS.get(name).streaming is not None}
    core = {name for name in MERGE_METHODS if MERGE_METHODS.get(name).space == "core"}
    assert streaming - core == set(PRESETS)


@on_gpu
@pytest.mark.parametrize("name", PRESETS)
def test_replayed_graphs_give_the_eager_factors(name: str, small_modules) -> None:
    pairs, merger = _run_layers(name, "cuda", layers=4)
    # per shape: the first module warms up eagerly, the second captures, all later ones replay
    assert merger.stats["replayed"] == 3 * 3 and not merger.uncapturable
    for graphed, eager in pairs:
        assert graphed.A.device.type == "cpu" and graphed.B.device.type == "cpu"
        product, expected = graphed.B @ graphed.A, (eager.B @ eager.A).cpu()
        torch.testing.assert_close(product, expected, atol=1e-5 * float(expected.abs().max()), rtol=1e-5)
        assert graphed.discarded_energy == pytest.approx(eager.discarded_energy, abs=1e-6)
