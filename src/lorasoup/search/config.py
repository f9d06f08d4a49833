"""The ``lorasoup search`` config: which adapters, which target examples, how to search, what to write.

Defaults and why:
- ``search.granularity: global``: LoraHub's one weight per adapter. ``layer`` and ``module`` exist, but
  a handful of examples rarely pins down hundreds of weights.
- ``search.bounds: [-1.5, 1.5]``, ``search.init: 0.0`` and ``search.l1: 0.05``: LoraHub's defaults
  (https://arxiv.org/abs/2307.13269). The L1 term is LoraHub's: ``l1 · mean |w|`` over all weights, so
  its strength does not depend on the granularity.
- ``search.population: 16``, ``search.iterations: 20``: 320 candidates, scored 16 at a time in one
  batched forward each (LoraHub's default budget is 40 candidates, scored one by one).
- ``search.sigma: null``: CMA-ES's initial step size, a quarter of the bounds' width (cma's advice).
- ``data``: the same fields as ``lorasoup cat``'s; give a handful of target-task examples.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

from lorasoup.config import require
from lorasoup.options import AdapterRef, DataConfig, Dtype, ExportOptions


@dataclass
class SearchOptions:
    """How the weights are searched (``search:`` in YAML)."""

    granularity: Literal["global", "layer", "module"] = "global"
    optimiser: str = "cma"
    population: int = 16
    iterations: int = 20
    l1: float = 0.05
    bounds: list[float] = field(default_factory=lambda: [-1.5, 1.5])
    init: float = 0.0
    init_from: str | None = None
    sigma: float | None = None
    seed: int = 0
    rows_per_forward: int | None = None
    dtype: Dtype = "float32"
    device: str | None = None

    def validate(self) -> None:
        from lorasoup.search.optimise import OPTIMISERS

        OPTIMISERS.get(self.optimiser)  # an unknown name is a one-line error naming the valid ones
        require(self.population >= 2, f"search.population must be at least 2, got {self.population}")
        require(self.iterations >= 1, f"search.iterations must be at least 1, got {self.iterations}")
        require(self.l1 >= 0 and math.isfinite(self.l1), f"search.l1 must be >= 0, got {self.l1}")
        require(
            len(self.bounds) == 2 and all(math.isfinite(b) for b in self.bounds),
            f"search.bounds must be [low, high], got {self.bounds}",
        )
        low, high = self.bounds
        require(low < high, f"search.bounds: low must be below high, got {self.bounds}")
        require(low <= self.init <= high, f"search.init {self.init} lies outside search.bounds {self.bounds}")
        require(self.sigma is None or self.sigma > 0, f"search.sigma must be positive, got {self.sigma}")
        require(
            self.rows_per_forward is None or self.rows_per_forward >= 1,
            f"search.rows_per_forward must be at least 1, got {self.rows_per_forward}",
        )

    @property
    def step_size(self) -> float:
        return self.sigma if self.sigma is not None else (self.bounds[1] - self.bounds[0]) / 4


@dataclass
class SearchRunConfig:
    """Everything ``lorasoup search`` needs; see ``configs/search-example.yaml``.

    ``warm_start_cat: true`` also writes ``cat-warm-start.yaml`` into the artifact: a ``lorasoup cat``
    config that starts CAT training from the found weights (``cat.init_from``); point its
    ``data.train`` at the training data before running it.
    """

    base_model: str
    adapters: list[AdapterRef]
    data: DataConfig
    output: str
    search: SearchOptions = field(default_factory=SearchOptions)
    export: ExportOptions = field(default_factory=ExportOptions)
    warm_start_cat: bool = True
    allow_base_mismatch: bool = False
    overwrite: bool = False

    def validate(self) -> None:
        require(bool(self.adapters), "adapters: list at least one adapter directory")
