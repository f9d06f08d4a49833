"""The ``lorasoup merge`` config, in the spirit of mergekit's: a method, weighted adapters, parameters.

```yaml
method: ties
base_model: meta-llama/Llama-2-7b-hf   # optional: names the base in the adapter; needed for `merge: true`
adapters:
  - {path: runs/math, weight: 1.0}
  - {path: runs/code, weight: 0.7}
parameters: {density: 0.2, rank: 64}
output: runs/math-code-ties
```

Each method's parameters are checked when the config loads: a method that does not use ``density``
refuses one, so a typo cannot silently change nothing.

``method: layer_swap`` takes its rule from a ``layer_swap:`` section (``lorasoup.merging.layer_swap``)::

    layer_swap: {first: 2, last: 2, edges: math, rest: code}   # or {layers: [math, code, ...]}

(adapter names: each adapter's ``name``, default its directory name). To have the rule chosen by a
search on a few target examples, use ``lorasoup search --layer-swap`` (``lorasoup.search.layer_swap``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from lorasoup.config import require
from lorasoup.errors import ConfigError
from lorasoup.lowrank import SvdMode
from lorasoup.merging.base import MERGE_METHODS, MergeParams
from lorasoup.merging.layer_swap import LayerSwapRule
from lorasoup.merging.ops import SignMethod

Dtype = Literal["float32", "bfloat16", "float16"]


@dataclass
class WeightedAdapter:
    """A PEFT adapter directory or hub id, its weight (negative subtracts it) and a short name."""

    path: str
    weight: float = 1.0
    name: str | None = None
    revision: str | None = None

    @classmethod
    def from_value(cls, value: Any, where: str) -> WeightedAdapter:
        if isinstance(value, str) and value:
            return cls(path=value)
        raise ConfigError(f"{where}: expected an adapter path or a mapping with 'path', got {value!r}")


@dataclass
class MergeParameters:
    density: float | None = None
    majority_sign: SignMethod | None = None
    rank: int | None = None
    energy: float | None = None
    svd: SvdMode = "randomized"

    def validate(self) -> None:
        require(
            self.density is None or 0.0 < self.density <= 1.0,
            f"parameters.density must be in (0, 1] (the fraction of entries kept), got {self.density}",
        )
        require(self.rank is None or self.rank >= 1, f"parameters.rank must be at least 1, got {self.rank}")
        require(
            self.energy is None or 0.0 < self.energy <= 1.0,
            f"parameters.energy must be in (0, 1] (fraction of ‖ΔW‖² kept), got {self.energy}",
        )


@dataclass
class LayerSwapOptions:
    """A layer-swap rule (:class:`lorasoup.merging.layer_swap.LayerSwapRule`): the ``first`` and ``last``
    layers take adapter ``edges``, the others ``rest``; or ``layers`` names one adapter per layer.
    ``other``: modules outside numbered layers (default ``rest``). ``num_layers``: the model's layer
    count when the adapters skip its last layers (default: what the adapted modules imply)."""

    rest: str | None = None
    edges: str | None = None
    first: int = 0
    last: int = 0
    layers: list[str] | None = None
    other: str | None = None
    num_layers: int | None = None

    def validate(self) -> None:
        require(
            self.layers is not None or self.rest is not None,
            "layer_swap: give 'rest' (the middle layers' adapter) with 'edges', 'first', 'last', "
            "or 'layers' (one adapter name per layer)",
        )
        require(self.num_layers is None or self.num_layers >= 1, "layer_swap.num_layers must be positive")

    def rule(self) -> LayerSwapRule:
        return LayerSwapRule(
            rest=self.rest,
            edges=self.edges,
            first=self.first,
            last=self.last,
            layers=None if self.layers is None else tuple(self.layers),
            other=self.other,
        )


@dataclass
class MergeRunConfig:
    """Everything ``lorasoup merge`` needs; see ``configs/merge-example.yaml``."""

    method: str
    adapters: list[WeightedAdapter]
    output: str
    parameters: MergeParameters = field(default_factory=MergeParameters)
    layer_swap: LayerSwapOptions | None = None
    base_model: str | None = None
    merge: bool = False
    seed: int = 0
    device: str | None = None
    dtype: Dtype = "float32"
    allow_base_mismatch: bool = False
    overwrite: bool = False

    def validate(self) -> None:
        method = MERGE_METHODS.get(self.method)  # unknown names list the valid ones
        require(bool(self.adapters), "adapters: list at least one adapter directory")
        params = self.parameters
        if method.uses_density:
            require(
                params.density is not None,
                f"parameters.density: method {self.method} needs the fraction of entries to keep, e.g. 0.2",
            )
        else:
            require(
                params.density is None, f"parameters.density: method {self.method} does not use it; remove it"
            )
        require(
            method.uses_sign or params.majority_sign is None,
            f"parameters.majority_sign: method {self.method} elects no signs; remove it",
        )
        if method.space in ("factor", "layer"):
            require(
                params.rank is None and params.energy is None,
                f"parameters.rank/energy: {self.method} keeps the adapters' rank; use 'svd' to change it",
            )
        require(
            (method.space == "layer") == (self.layer_swap is not None),
            f"layer_swap: the section goes with method layer_swap (method is {self.method}); "
            + ("add a layer_swap: section" if method.space == "layer" else "remove it"),
        )
        require(
            not self.merge or self.base_model is not None,
            "merge: true writes full merged weights, so base_model must name the base model",
        )

    def merge_params(self) -> MergeParams:
        p = self.parameters
        return MergeParams(
            density=1.0 if p.density is None else p.density,
            majority_sign=p.majority_sign or "total",
            rank=p.rank,
            energy=p.energy,
            svd=p.svd,
        )
