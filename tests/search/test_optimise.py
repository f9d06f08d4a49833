"""The ask/tell minimisers: they find a known minimum in the box, and their randomness is their own."""

import numpy as np
import pytest
import torch

from lorasoup.errors import ConfigError, LorasoupError
from lorasoup.search.optimise import OPTIMISERS, OptimiserSpec, minimise

TARGET = np.array([0.3, -1.5, 1.1])  # one coordinate on the bound


def quadratic(candidates):
    return ((candidates - TARGET) ** 2).sum(-1)


def spec(seed=0, x0=None, population=8):
    x0 = np.zeros(3) if x0 is None else x0
    return OptimiserSpec(x0=x0, bounds=(-1.5, 1.5), population=population, sigma=0.75, seed=seed)


def test_cma_finds_the_minimum_within_the_bounds():
    asked = []

    def objective(candidates):
        asked.append(candidates)
        return quadratic(candidates)

    trace = minimise(objective, spec(), iterations=60)
    np.testing.assert_allclose(trace.best, TARGET, atol=1e-3)
    assert all(c.shape == (8, 3) for c in asked[1:])  # whole populations, after the start point
    assert all(np.all(np.abs(c) <= 1.5) for c in asked)
    assert trace.best_so_far == sorted(trace.best_so_far, reverse=True)
    assert trace.start_loss == pytest.approx(float(quadratic(np.zeros(3))))


def test_same_seed_same_search_and_no_global_rng():
    np.random.seed(1)
    torch.manual_seed(1)
    numpy_state, torch_state = np.random.get_state()[1].copy(), torch.get_rng_state().clone()
    first = minimise(quadratic, spec(seed=7), iterations=10)
    assert np.array_equal(np.random.get_state()[1], numpy_state)
    assert torch.equal(torch.get_rng_state(), torch_state)
    np.random.seed(99)  # a different global state changes nothing
    second = minimise(quadratic, spec(seed=7), iterations=10)
    other = minimise(quadratic, spec(seed=8), iterations=10)
    assert np.array_equal(first.best, second.best) and first.iteration_mean == second.iteration_mean
    assert first.iteration_mean != other.iteration_mean


def test_the_start_is_kept_when_nothing_beats_it():
    trace = minimise(quadratic, spec(x0=TARGET.copy()), iterations=3)
    assert trace.best_iteration == 0 and np.array_equal(trace.best, TARGET) and trace.best_loss == 0.0
    assert trace.evaluations == 1 + 3 * 8


def test_random_search_samples_the_box_and_improves_on_a_bad_start():
    trace = minimise(quadratic, spec(x0=np.full(3, 1.5)), optimiser="random", iterations=20)
    assert trace.best_loss < trace.start_loss
    assert np.all(np.abs(trace.best) <= 1.5)


def test_unknown_optimiser_and_out_of_box_start_are_config_errors():
    with pytest.raises(ConfigError, match="did you mean 'cma'"):
        OPTIMISERS.get("cmaes")
    with pytest.raises(ConfigError, match="outside the bounds"):
        minimise(quadratic, spec(x0=np.full(3, 2.0)), iterations=1)


def test_a_non_finite_loss_stops_the_search_with_a_one_line_error():
    def objective(candidates):
        losses = quadratic(candidates)
        losses[-1] = np.nan if len(candidates) > 1 else losses[-1]
        return losses

    with pytest.raises(LorasoupError, match="1 of 8 candidates have a non-finite loss"):
        minimise(objective, spec(), iterations=2)
