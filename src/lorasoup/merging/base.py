"""What every merge method is: a function from one module's adapter factors to new factors.

Merges run module by module (streaming: at most one module's dense ``ΔW`` per adapter exists at a
time), so a method is a :class:`MergeMethod` whose ``merge`` maps the K adapters' factors of one
module to a :class:`ModuleMerge`. The runner (``lorasoup.merging.run``) does the I/O around it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal, Protocol

import torch
from torch import Tensor

from lorasoup.adapters import LoraFactors
from lorasoup.lowrank import SvdMode
from lorasoup.merging.ops import SignMethod
from lorasoup.registry import Registry

# core: merged as small cores in shared bases (core_space); layer: one adapter per layer, the weights
# given per module by a rule (layer_swap)
Space = Literal["delta", "factor", "core", "layer"]


@dataclass(frozen=True)
class MergeParams:
    """Method parameters; each method reads only those it documents.

    ``density``: fraction kept by TIES/DARE/magnitude pruning. ``majority_sign``: TIES sign election.
    ``rank`` / ``energy``: the rank of the result, or the fraction of ``‖ΔW‖²`` to keep, when a method
    re-extracts a low-rank adapter (``None``: the method's default, see each method). ``svd``: how a
    dense merged ``ΔW`` is factorised back (exact full SVD or seeded randomized range finder).
    """

    density: float = 1.0
    majority_sign: SignMethod = "total"
    rank: int | None = None
    energy: float | None = None
    svd: SvdMode = "randomized"


@dataclass(frozen=True)
class ModuleMerge:
    """Result for one module: ``ΔW = B @ A`` at scale 1. ``A (k, in)``, ``B (out, k)``.

    ``discarded_energy``: fraction of the merged update's ``‖ΔW‖_F²`` lost when re-extracting a
    low-rank adapter (``None`` when the method is exact and needed no truncation).
    """

    A: Tensor
    B: Tensor
    discarded_energy: float | None = None


MergeFunction = Callable[[Sequence[LoraFactors | None], Tensor, MergeParams, torch.Generator], ModuleMerge]


class StreamingMerge(Protocol):
    """A merge that takes the modules of one run one after another and may finish them later (to
    overlap one module's host work with the next one's device work). Results come back in the order
    submitted, ``A`` and ``B`` on the host."""

    def submit(
        self,
        name: str,
        factors: Sequence[LoraFactors | None],
        weights: Tensor,
        params: MergeParams,
        generator: torch.Generator,
    ) -> list[tuple[str, ModuleMerge]]:
        """Start module ``name``; returns the modules finished meanwhile."""
        ...

    def finish(self) -> list[tuple[str, ModuleMerge]]:
        """Complete every module submitted; returns those not returned yet."""
        ...


@dataclass(frozen=True)
class MergeMethod:
    """A registered merge. ``merge(factors, weights (K,), params, generator)`` handles one module.

    ``factors[i]`` is ``None`` where adapter ``i`` does not adapt the module (its update is zero).
    ``space`` says where the method acts: on the update ``ΔW`` ("delta", exact maths) or on A and B
    separately ("factor", PEFT's ``add_weighted_adapter`` behaviour, which creates cross terms
    ``B_i A_j``; kept to reproduce published baselines), as small cores in shared bases ("core"), or
    per layer ("layer": the runner hands each module its own weights, from the run's rule).
    """

    name: str
    merge: MergeFunction
    space: Space
    summary: str
    reference: str
    uses_density: bool = False
    uses_sign: bool = False
    random: bool = False
    streaming: Callable[[torch.device], StreamingMerge] | None = None
    """Makes a :class:`StreamingMerge` for the modules of one run on a CUDA device (captured graphs,
    pipelined; or modules of one shape merged in batches); it gives ``merge``'s results. ``None``:
    ``merge`` everywhere."""


MERGE_METHODS: Registry[MergeMethod] = Registry("merge method")


def register(method: MergeMethod) -> MergeMethod:
    return MERGE_METHODS.add(method.name, method)


def present(factors: Sequence[LoraFactors | None], weights: Tensor) -> tuple[list[LoraFactors], Tensor]:
    """The adapters that adapt this module and their weights (absent ones contribute zero)."""
    index = [i for i, f in enumerate(factors) if f is not None]
    if not index:
        raise ValueError("no adapter adapts this module")
    return [factors[i] for i in index], weights[index]  # type: ignore[misc]
