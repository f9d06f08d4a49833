"""Gradient-free minimisers with an ask/tell interface: whole populations in, their losses out.

``cma`` is CMA-ES (Hansen, https://arxiv.org/abs/1604.00772) from the ``cma`` package, the optional
``lorasoup[search]`` extra; ``random`` samples uniformly within the bounds (a baseline). Both draw
from their own ``numpy.random.Generator(seed)``, never from numpy's or torch's global RNG, so the
same seed gives the same search whatever else the process does.

:func:`minimise` runs the loop: ``ask`` P candidates ``X (P, D)``, score them all at once, ``tell`` the
losses, keep the best candidate ever scored (the objective is deterministic: the same examples every
time), and stop after ``iterations`` or when the optimiser says it has converged.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from lorasoup.errors import ConfigError, LorasoupError
from lorasoup.registry import Registry

Objective = Callable[[np.ndarray], np.ndarray]
"""``X (P, D)`` → losses ``(P,)``."""
ProgressHook = Callable[[int, int, float], None]
"""``(iteration, iterations, best loss so far)``."""


class Optimiser(Protocol):
    def ask(self) -> np.ndarray:
        """The next population ``X (P, D)``, every entry within the bounds."""

    def tell(self, candidates: np.ndarray, losses: np.ndarray) -> None:
        """The losses ``(P,)`` of the population last asked for."""

    def stop_reason(self) -> str | None:
        """Why the optimiser considers itself done, or None."""


@dataclass(frozen=True)
class OptimiserSpec:
    x0: np.ndarray  # (D,) starting point, within the bounds
    bounds: tuple[float, float]
    population: int
    sigma: float  # initial step size (CMA-ES); ignored by ``random``
    seed: int


OPTIMISERS: Registry[Callable[[OptimiserSpec], Optimiser]] = Registry("optimiser")


class CmaOptimiser:
    """CMA-ES with box bounds (cma's ``BoundTransform``: asked candidates always lie within them)."""

    def __init__(self, spec: OptimiserSpec) -> None:
        try:
            import cma
        except ImportError:
            raise ConfigError(
                "search.optimiser 'cma' needs the cma package: pip install 'lorasoup[search]' "
                "(or choose search.optimiser: random)"
            ) from None
        rng = np.random.default_rng(spec.seed)
        options = {
            "popsize": spec.population,
            "bounds": list(spec.bounds),
            # With its own randn, cma never seeds or draws from numpy's global RNG (seed=nan: unused).
            "randn": lambda *shape: rng.standard_normal(shape),
            "seed": float("nan"),
            "verbose": -9,
            "verb_log": 0,
            "verb_disp": 0,
        }
        self._es = cma.CMAEvolutionStrategy(spec.x0.astype(float).tolist(), spec.sigma, options)

    def ask(self) -> np.ndarray:
        return np.asarray(self._es.ask(), dtype=np.float64)

    def tell(self, candidates: np.ndarray, losses: np.ndarray) -> None:
        self._es.tell(list(candidates), [float(v) for v in losses])

    def stop_reason(self) -> str | None:
        reasons = dict(self._es.stop())
        return ", ".join(f"{k}={v}" for k, v in reasons.items()) or None


class RandomOptimiser:
    """Uniform samples within the bounds: the baseline any search method should beat."""

    def __init__(self, spec: OptimiserSpec) -> None:
        self._spec = spec
        self._rng = np.random.default_rng(spec.seed)

    def ask(self) -> np.ndarray:
        low, high = self._spec.bounds
        return self._rng.uniform(low, high, size=(self._spec.population, len(self._spec.x0)))

    def tell(self, candidates: np.ndarray, losses: np.ndarray) -> None:
        pass

    def stop_reason(self) -> str | None:
        return None


OPTIMISERS.add("cma", CmaOptimiser)
OPTIMISERS.add("random", RandomOptimiser)


@dataclass
class SearchTrace:
    """The best candidate ever scored and the loss history, one entry per iteration."""

    start: np.ndarray  # (D,) where the search began
    start_loss: float
    best: np.ndarray  # (D,)
    best_loss: float
    best_iteration: int  # 0: nothing beat the start
    evaluations: int = 0
    iteration_best: list[float] = field(default_factory=list)
    iteration_mean: list[float] = field(default_factory=list)
    best_so_far: list[float] = field(default_factory=list)
    stop_reason: str = "iterations"


def minimise(
    objective: Objective,
    spec: OptimiserSpec,
    *,
    optimiser: str = "cma",
    iterations: int,
    progress: ProgressHook | None = None,
) -> SearchTrace:
    """Minimise ``objective`` over the box ``spec.bounds`` with ``iterations`` populations at most.

    The starting point ``x0`` is scored first (iteration 0, not counted in the history), so the
    result is never worse than where the search began.
    """
    low, high = spec.bounds
    if np.any(spec.x0 < low) or np.any(spec.x0 > high):
        raise ConfigError(f"the starting weights lie outside the bounds [{low}, {high}]")
    start = float(objective(spec.x0[None, :])[0])
    trace = SearchTrace(
        start=spec.x0.copy(), start_loss=start, best=spec.x0.copy(), best_loss=start, best_iteration=0
    )
    trace.evaluations = 1
    engine = OPTIMISERS.get(optimiser)(spec)
    for iteration in range(1, iterations + 1):
        candidates = engine.ask()  # (P, D)
        losses = np.asarray(objective(candidates), dtype=np.float64)  # (P,)
        if not np.isfinite(losses).all():
            bad = int((~np.isfinite(losses)).sum())
            raise LorasoupError(
                f"iteration {iteration}: {bad} of {len(losses)} candidates have a non-finite loss; "
                "search in float32 (search.dtype) or narrow search.bounds"
            )
        engine.tell(candidates, losses)
        trace.evaluations += len(losses)
        winner = int(np.argmin(losses))
        if losses[winner] < trace.best_loss:
            trace.best, trace.best_loss = candidates[winner].copy(), float(losses[winner])
            trace.best_iteration = iteration
        trace.iteration_best.append(float(losses[winner]))
        trace.iteration_mean.append(float(losses.mean()))
        trace.best_so_far.append(trace.best_loss)
        if progress is not None:
            progress(iteration, iterations, trace.best_loss)
        reason = engine.stop_reason()
        if reason is not None:
            trace.stop_reason = reason
            break
    return trace
