"""TIES, DARE and magnitude pruning on ``ΔW`` registered as merge methods: presets of the
sparsify × sign-consensus family computed in ``lorasoup.merging.delta``, each with its paper and, on
a GPU, the graphed streaming merge (``lorasoup.merging.graphed``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from lorasoup.adapters import LoraFactors
from lorasoup.merging.base import (
    MergeMethod,
    MergeParams,
    ModuleMerge,
    StreamingMerge,
    register,
)
from lorasoup.merging.delta import RECIPES, merge_delta

TIES = "TIES-Merging, Yadav et al. 2023, https://arxiv.org/abs/2306.01708"
DARE = "DARE, Yu et al. 2024, https://arxiv.org/abs/2311.03099"


def _delta_merge(name: str) -> object:
    recipe = RECIPES[name]

    def merge(
        factors: Sequence[LoraFactors | None],
        weights: Tensor,
        params: MergeParams,
        generator: torch.Generator,
    ) -> ModuleMerge:
        return merge_delta(recipe, factors, weights, params, generator)

    merge.__name__ = f"merge_{name}"
    merge.__doc__ = f"``{name}`` on ΔW ({recipe.sparsify} sparsification, {recipe.consensus} consensus)."
    return merge


def _graphed(name: str) -> Callable[[torch.device], StreamingMerge]:
    def start(device: torch.device) -> StreamingMerge:
        from lorasoup.merging.graphed import GraphedDeltaMerge

        return GraphedDeltaMerge(RECIPES[name], device)

    return start


_PRESETS = {
    "ties": ("trim to the top `density` by magnitude, elect signs, average agreeing entries", TIES),
    "dare_linear": ("drop entries at random (keep `density`), rescale by 1/density, weighted sum", DARE),
    "dare_ties": ("DARE's random drop and rescale, then TIES' sign election and disjoint mean", DARE),
    "magnitude_prune": ("trim to the top `density` by magnitude, weighted sum", TIES),
}

for _name, (_summary, _reference) in _PRESETS.items():
    register(
        MergeMethod(
            name=_name,
            merge=_delta_merge(_name),  # type: ignore[arg-type]
            space="delta",
            summary=_summary + " (on ΔW, re-extracted at a chosen rank)",
            reference=_reference,
            uses_density=True,
            uses_sign=RECIPES[_name].consensus == "sign",
            random=RECIPES[_name].sparsify == "random",
            streaming=_graphed(_name),
        )
    )
