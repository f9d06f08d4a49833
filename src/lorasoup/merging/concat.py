"""Merges that are exact in ``ΔW`` space through concatenation: ``linear`` and ``svd``.

``Σ_i w_i s_i B_i A_i = [B_1 … B_K] · [w_1 s_1 A_1; …; w_K s_K A_K]``: stacking the factors gives
the weighted sum of the updates exactly, with rank ``R = Σ r_i`` and no cross terms ``B_i A_j``
(which averaging A and B separately would create). ``svd`` then recompresses that stack to rank
``k`` with the exact QR-based truncated SVD of ``lorasoup.lowrank``, never forming ``ΔW``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from lorasoup.adapters import LoraFactors
from lorasoup.lowrank import recompress
from lorasoup.merging.base import MergeMethod, MergeParams, ModuleMerge, present, register


def concatenate(factors: Sequence[LoraFactors], weights: Tensor) -> tuple[Tensor, Tensor]:
    """``A (R, in)``, ``B (out, R)`` with ``B @ A = Σ_i w_i s_i B_i A_i``, in float32."""
    A = torch.cat([float(w) * f.scale * f.A.float() for f, w in zip(factors, weights, strict=True)], dim=0)
    B = torch.cat([f.B.float() for f in factors], dim=1)
    return A, B


def merge_linear(
    factors: Sequence[LoraFactors | None], weights: Tensor, params: MergeParams, generator: torch.Generator
) -> ModuleMerge:
    """Task arithmetic, exact: rank ``Σ r_i``; recompressed only when ``rank``/``energy`` is given."""
    kept, w = present(factors, weights)
    A, B = concatenate(kept, w)
    if params.rank is None and params.energy is None:
        return ModuleMerge(A=A, B=B)
    low = recompress(A, B, rank=params.rank, energy=params.energy)
    return ModuleMerge(A=low.A, B=low.B, discarded_energy=low.discarded_energy)


def merge_svd(
    factors: Sequence[LoraFactors | None], weights: Tensor, params: MergeParams, generator: torch.Generator
) -> ModuleMerge:
    """Task arithmetic recompressed to rank ``k`` (default: the largest input rank, as PEFT's ``svd``)."""
    kept, w = present(factors, weights)
    A, B = concatenate(kept, w)
    rank = params.rank if params.rank is not None or params.energy is not None else max(f.rank for f in kept)
    low = recompress(A, B, rank=rank, energy=params.energy)
    return ModuleMerge(A=low.A, B=low.B, discarded_energy=low.discarded_energy)


register(
    MergeMethod(
        name="linear",
        merge=merge_linear,
        space="delta",
        summary="Σ w_i ΔW_i exactly, by concatenating the factors (rank = sum of ranks)",
        reference="Task arithmetic, Ilharco et al. 2023, https://arxiv.org/abs/2212.04089",
    )
)
register(
    MergeMethod(
        name="svd",
        merge=merge_svd,
        space="delta",
        summary="Σ w_i ΔW_i, then the exact truncated SVD at rank k (QR of the factors, never dense)",
        reference="Eckart–Young truncation; PEFT's `svd` combination computes the same densely",
    )
)
