"""PEFT-style merges that act on A and B separately: kept under explicit ``*_factor`` names.

PEFT's ``add_weighted_adapter`` (``linear``, ``ties``, ``dare_*``, ``magnitude_prune``) merges the A
matrices with each other and the B matrices with each other, each scaled by ``√|w_i s_i|`` (the sign
on A). The product of the merged factors is ``(Σ_i b_i B_i)(Σ_j a_j A_j)``, which contains the cross
terms ``B_i A_j`` for ``i ≠ j``: updates that no adapter learned. It is not task arithmetic, but it is
what published baselines (the LoRA Soups paper's included) ran, so lorasoup reproduces it under
names that say what it is. Ranks must match, as in PEFT.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from lorasoup.adapters import LoraFactors
from lorasoup.merging.base import MergeMethod, MergeParams, ModuleMerge, present, register
from lorasoup.merging.delta import RECIPES, merge_tasks

PEFT = (
    "PEFT `LoraModel.add_weighted_adapter`, https://huggingface.co/docs/peft/developer_guides/model_merging"
)


def factor_weights(factors: Sequence[LoraFactors], weights: Tensor) -> tuple[Tensor, Tensor]:
    """Per-adapter multipliers for A and for B: ``(sign·√|w s|, √|w s|)``, each ``(K,)``."""
    scaled = [float(w) * f.scale for f, w in zip(factors, weights, strict=True)]
    roots = torch.tensor([math.sqrt(abs(v)) for v in scaled], dtype=torch.float32)
    signs = torch.tensor([1.0 if v >= 0 else -1.0 for v in scaled])
    return roots * signs, roots


def _factor_merge(name: str) -> object:
    recipe = RECIPES[name]

    def merge(
        factors: Sequence[LoraFactors | None],
        weights: Tensor,
        params: MergeParams,
        generator: torch.Generator,
    ) -> ModuleMerge:
        kept, w = present(factors, weights)
        ranks = sorted({f.rank for f in kept})
        if len(ranks) > 1:
            raise ValueError(
                f"{name}_factor needs adapters of one rank, got ranks {ranks}; use the exact ΔW-space "
                f"method '{name}' instead"
            )
        a_weights, b_weights = factor_weights(kept, w)
        device = kept[0].A.device
        merged = []
        # A first, then B, each adapter in order: the same random draws, in the same order, as PEFT.
        for stack, stack_weights in (
            (torch.stack([f.A.float() for f in kept]), a_weights),
            (torch.stack([f.B.float() for f in kept]), b_weights),
        ):
            merged.append(
                merge_tasks(
                    stack,
                    stack_weights.to(device),
                    recipe,
                    density=params.density,
                    sign_method=params.majority_sign,
                    generator=generator,
                    elect_on_weighted=False,
                )
            )
        return ModuleMerge(A=merged[0], B=merged[1])

    merge.__name__ = f"merge_{name}_factor"
    merge.__doc__ = f"PEFT's ``{name}`` on A and B separately (cross terms included)."
    return merge


for _name in RECIPES:
    register(
        MergeMethod(
            name=f"{_name}_factor",
            merge=_factor_merge(_name),  # type: ignore[arg-type]
            space="factor",
            summary=f"PEFT's `{_name}` on A and B separately (creates cross terms B_i A_j)",
            reference=PEFT,
            uses_density=_name != "linear",
            uses_sign=RECIPES[_name].consensus == "sign",
            random=RECIPES[_name].sparsify == "random",
        )
    )
