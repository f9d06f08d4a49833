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

A ``layer_swap:`` section (or ``lorasoup search --layer-swap``) makes the search choose a layer swap
instead: every rule of a small family is scored on the same examples (``search.layer_swap``). It
lives here, not in ``lorasoup merge``, because it needs what this command already has and a merge
never loads (the base model, a tokenizer, target examples, a CAT composition), and because a search
may import the merges but not the other way round (``docs/architecture.md``). Of ``search:`` it
reads ``seed``, ``rows_per_forward``, ``dtype`` and ``device``; the weight optimiser's settings are
refused, as are ``export.rank`` and ``export.rank_bucket`` (a swap keeps the chosen adapters' ranks).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal, get_args

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


SwapFamily = Literal["uniform", "blocks", "edges"]

WEIGHT_SEARCH_ONLY = ("optimiser", "population", "iterations", "l1", "bounds", "init", "init_from", "sigma")
"""``search:`` fields a layer-swap search has no use for: refused unless left at their defaults."""


@dataclass
class LayerSwapSearchOptions:
    """Choose a layer swap by scoring a family of rules (``layer_swap:`` in YAML).

    ``families``: which rules to try (``uniform``: one adapter everywhere; ``blocks``: the lowest n
    layers from one adapter, the rest from another; ``edges``: the first and last n from one, the middle
    from another), ``K + K(K-1)(L-1) + K(K-1)⌊(L-1)/2⌋`` rules for all three. ``other``: the adapter of
    modules outside numbered layers in every rule (default: each rule's ``rest``).
    """

    families: list[SwapFamily] = field(default_factory=lambda: list(get_args(SwapFamily)))
    other: str | None = None

    def validate(self) -> None:
        require(bool(self.families), "layer_swap.families: list at least one of uniform, blocks, edges")
        require(
            len(set(self.families)) == len(self.families),
            f"layer_swap.families: each family once, got {self.families}",
        )


@dataclass
class SearchRunConfig:
    """Everything ``lorasoup search`` needs; see ``configs/search-example.yaml``.

    ``warm_start_cat: true`` also writes ``cat-warm-start.yaml`` into the artifact: a ``lorasoup cat``
    config that starts CAT training from the found weights (``cat.init_from``); point its
    ``data.train`` at the training data before running it. ``layer_swap:`` (a section, possibly empty)
    scores layer-swap rules instead of searching weights (``lorasoup.search.layer_swap_run``).
    """

    base_model: str
    adapters: list[AdapterRef]
    data: DataConfig
    output: str
    search: SearchOptions = field(default_factory=SearchOptions)
    export: ExportOptions = field(default_factory=ExportOptions)
    warm_start_cat: bool = True
    layer_swap: LayerSwapSearchOptions | None = None
    allow_base_mismatch: bool = False
    overwrite: bool = False

    def validate(self) -> None:
        require(bool(self.adapters), "adapters: list at least one adapter directory")
        if self.layer_swap is not None:
            self._check_layer_swap()

    def _check_layer_swap(self) -> None:
        """A layer-swap search refuses the settings it would silently ignore."""
        require(
            len(self.adapters) >= 2,
            f"adapters: a layer swap chooses between adapters; list at least two, got {len(self.adapters)}",
        )
        require(
            self.search.granularity in ("global", "layer"),
            f"search.granularity: a layer swap is per layer; remove it (got {self.search.granularity!r})",
        )
        defaults = SearchOptions()
        for name in WEIGHT_SEARCH_ONLY:
            require(
                getattr(self.search, name) == getattr(defaults, name),
                f"search.{name}: the layer-swap search scores a fixed family of rules and does not use it; "
                "remove it (or remove the layer_swap: section to search weights)",
            )
        require(
            self.export.rank is None and self.export.rank_bucket == "none",
            "export.rank/rank_bucket: a layer swap keeps the chosen adapters' ranks; remove them "
            "(lorasoup compress recompresses the result)",
        )
