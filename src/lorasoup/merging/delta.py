"""TIES, DARE and magnitude pruning on the update ``ΔW``, module by module, as their papers define them.

The family is sparsify × sign consensus (see ``lorasoup.merging.ops``):

=================  ============  ==========
preset             sparsify      consensus
=================  ============  ==========
linear (dense)     none          none
ties               magnitude     sign
dare_linear        random        none
dare_ties          random        sign
magnitude_prune    magnitude     none
=================  ============  ==========

These act elementwise on each task vector ``τ_i = s_i B_i A_i``, so the merged update is dense and
usually of full rank. It is factorised back into a LoRA at ``rank`` (default: the sum of the input
ranks) or at the smallest rank keeping ``energy`` of ``‖ΔW‖²``; the discarded energy is reported per
module. Only the merged ``ΔW`` of one module is ever dense: the tasks are built, trimmed and combined
a block of rows at a time (``lorasoup.merging.rowwise``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from lorasoup.adapters import LoraFactors
from lorasoup.lowrank import dense_lowrank
from lorasoup.merging.base import MergeParams, ModuleMerge, present
from lorasoup.merging.ops import (
    SignMethod,
    disjoint_mean,
    drop_random,
    elect_sign,
    keep_top_magnitude,
    keep_top_magnitude_each,
    sign_agreement,
    weight_tasks,
    weighted_sum,
)
from lorasoup.merging.rowwise import merge_rowwise


@dataclass(frozen=True)
class Recipe:
    sparsify: Literal["none", "magnitude", "random"]
    consensus: Literal["none", "sign"]


RECIPES = {
    "linear": Recipe("none", "none"),
    "ties": Recipe("magnitude", "sign"),
    "dare_linear": Recipe("random", "none"),
    "dare_ties": Recipe("random", "sign"),
    "magnitude_prune": Recipe("magnitude", "none"),
}


def merge_tasks(
    tasks: Tensor,
    weights: Tensor,
    recipe: Recipe,
    *,
    density: float,
    sign_method: SignMethod,
    generator: torch.Generator,
    elect_on_weighted: bool = True,
) -> Tensor:
    """One preset of the family: ``tasks (K, *shape)``, ``weights (K,)`` → merged ``(*shape)``.

    ``elect_on_weighted``: elect the sign from ``w_i τ̂_i`` (so a negative weight flips a task's
    vote, as task negation intends) or from the unweighted ``τ̂_i`` (what PEFT does; used by the
    factor-space variants to reproduce it).
    """
    sparse = sparsify_tasks(tasks, recipe, density, generator)
    return combine_tasks(sparse, weights, recipe, sign_method, elect_on_weighted=elect_on_weighted)


def sparsify_tasks(tasks: Tensor, recipe: Recipe, density: float, generator: torch.Generator) -> Tensor:
    """The sparsify half of :func:`merge_tasks`: each of ``tasks (K, *shape)`` trimmed to its top
    ``density`` by magnitude, dropped at random (draws in task order), or kept → ``(K, *shape)``."""
    if recipe.sparsify == "magnitude":
        return torch.stack([keep_top_magnitude(t, density) for t in tasks])
    if recipe.sparsify == "random":
        return torch.stack([drop_random(t, density, generator) for t in tasks])
    return tasks


def combine_tasks(
    sparse: Tensor,
    weights: Tensor,
    recipe: Recipe,
    sign_method: SignMethod,
    *,
    elect_on_weighted: bool = True,
) -> Tensor:
    """The consensus half of :func:`merge_tasks`, on sparsified ``sparse (K, *shape)``: a weighted sum,
    or sign election and disjoint mean. Elementwise over ``shape``, so ``weights`` may be ``(K,)`` or
    ``(K, *lead)`` for a batch ``lead`` of independent merges leading ``shape``."""
    if recipe.consensus == "none":
        return weighted_sum(sparse, weights)
    weighted = weight_tasks(sparse, weights)
    voters = weighted if elect_on_weighted else sparse
    sign = elect_sign(voters, sign_method)
    return disjoint_mean(weighted, sign_agreement(voters, sign))


def merge_task_batch(
    tasks: Tensor,
    weights: Tensor,
    recipe: Recipe,
    *,
    density: float,
    sign_method: SignMethod,
    generators: Sequence[torch.Generator],
) -> Tensor:
    """:func:`merge_tasks` on each of G independent merges at once: ``tasks (G, K, *shape)``,
    ``weights (G, K)``, one generator per merge → ``(G, *shape)``.

    Each merge's result is :func:`merge_tasks`'s for it: the trim ranks each task of each merge on
    its own (:func:`keep_top_magnitude_each`, which reads nothing back), the random drop draws from
    merge ``g``'s own generator in the order :func:`merge_tasks` would, and the consensus is elementwise.
    """
    if recipe.sparsify == "magnitude":  # every task of every merge in one pass
        sparse = keep_top_magnitude_each(tasks.flatten(0, 1), density).reshape(tasks.shape)
    else:  # DARE's draws, merge by merge, each from its own generator
        sparse = torch.stack(
            [sparsify_tasks(t, recipe, density, g) for t, g in zip(tasks, generators, strict=True)]
        )
    # tasks first for the consensus, which reduces over dim 0
    return combine_tasks(sparse.transpose(0, 1), weights.T, recipe, sign_method)


def merge_delta(
    recipe: Recipe,
    factors: Sequence[LoraFactors | None],
    weights: Tensor,
    params: MergeParams,
    generator: torch.Generator,
) -> ModuleMerge:
    """One preset on one module, eagerly: the merged ``ΔW`` row block by row block, then its low-rank
    factors (at ``params.rank``, default the sum of the input ranks)."""
    kept, w = present(factors, weights)
    merged = merge_rowwise(
        kept,
        w,
        sparsify=recipe.sparsify,
        consensus=recipe.consensus,
        density=params.density,
        sign_method=params.majority_sign,
        generator=generator,
    )
    low = dense_lowrank(
        merged, rank=output_rank(kept, params), energy=params.energy, mode=params.svd, generator=generator
    )
    return ModuleMerge(A=low.A, B=low.B, discarded_energy=low.discarded_energy)


def output_rank(kept: Sequence[LoraFactors], params: MergeParams) -> int:
    return params.rank if params.rank is not None else sum(f.rank for f in kept)
