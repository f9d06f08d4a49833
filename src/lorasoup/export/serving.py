"""Serving helpers: rank buckets of serving engines, and exact zero-row rank padding.

vLLM compiles LoRA kernels for a fixed set of ranks; an adapter of another rank is padded with zero
rank rows to the next bucket, which leaves ``ΔW = B A`` unchanged.
"""

from __future__ import annotations

import torch
from torch import Tensor

from lorasoup.adapters import LoraFactors

VLLM_RANK_BUCKETS = (8, 16, 32, 64, 128, 256, 320, 512)


def pad_rank(A: Tensor, B: Tensor, rank: int) -> tuple[Tensor, Tensor]:
    """Zero rank rows up to ``rank``, leaving ``B A`` unchanged.

    ``A (r, in) → (rank, in)``, ``B (out, r) → (out, rank)``.
    """
    extra = rank - A.shape[0]
    if extra < 0:
        raise ValueError(f"cannot pad rank {A.shape[0]} down to {rank}")
    if extra == 0:
        return A, B
    return (
        torch.cat([A, A.new_zeros(extra, A.shape[1])], dim=0),
        torch.cat([B, B.new_zeros(B.shape[0], extra)], dim=1),
    )


def pad_factors(factors: LoraFactors, rank: int, dtype: torch.dtype | None = None) -> LoraFactors:
    """:func:`pad_rank` on a module's factors, cast to ``dtype`` if given, contiguous: what an exported
    adapter holds, one ``r`` for every module."""
    A, B = pad_rank(factors.A, factors.B, rank)
    if dtype is not None:
        A, B = A.to(dtype), B.to(dtype)
    return LoraFactors(A.contiguous(), B.contiguous(), factors.scale)


def next_bucket(rank: int, buckets: tuple[int, ...] = VLLM_RANK_BUCKETS) -> int:
    """The smallest serving bucket that holds ``rank``; ``ValueError`` if none does."""
    for bucket in buckets:
        if bucket >= rank:
            return bucket
    raise ValueError(f"rank {rank} exceeds the largest bucket {buckets[-1]}")
