"""Elementwise merge operations on stacked task tensors: sparsify, elect a sign, combine.

Every merge of the task-arithmetic family is built from three orthogonal steps (as mergekit's
"generalised task arithmetic" frames it):

1. **sparsify** each task tensor ``τ_i``: keep all (linear), the top ``density`` fraction by
   magnitude (TIES, https://arxiv.org/abs/2306.01708), or a random ``density`` fraction rescaled by
   ``1/density`` (DARE, https://arxiv.org/abs/2311.03099);
2. **weight** them: ``w_i τ̂_i`` (negative weights subtract a skill);
3. **combine**: a plain sum, or TIES' sign consensus: elect the sign of every entry and average only
   the weighted entries that agree with it ("disjoint mean").

All functions are pure: inputs are never modified, randomness only through the ``generator`` given.
Shapes: ``tasks (K, *shape)`` stacks K task tensors of any common shape; ``weights (K,)``, or
``(K, *lead)`` where ``shape`` starts with a batch ``lead`` of independent merges (one weight per task
and per merge: the batched core-space merge).
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

SignMethod = Literal["total", "frequency"]


def check_density(density: float) -> None:
    if not 0.0 < density <= 1.0:
        raise ValueError(f"density must be in (0, 1], got {density}")


def keep_top_magnitude(tensor: Tensor, density: float) -> Tensor:
    """Zero all but the ``int(density · numel)`` entries of largest ``|value|`` (at least one kept).

    ``tensor (*shape)`` → same shape. Density 1 returns an unchanged copy.
    """
    check_density(density)
    if density == 1.0:
        return tensor.clone()
    flat = tensor.reshape(-1)
    k = max(1, int(density * flat.numel()))
    # A threshold instead of topk: topk's int64 indices alone are twice an fp32 tensor's size, and
    # these tensors are whole ΔW matrices (11008 × 4096 for a 7B MLP).
    magnitude = flat.abs()
    threshold = magnitude.kthvalue(flat.numel() - k + 1).values
    mask = magnitude > threshold
    ties = magnitude == threshold
    del magnitude
    missing = k - int(mask.sum())
    if int(ties.sum()) == missing:
        mask |= ties
    else:  # more entries equal the threshold than places left: keep the first ones, by position
        mask |= ties & (ties.cumsum(0) <= missing)
    return (flat * mask).reshape(tensor.shape)


def keep_top_magnitude_each(tensors: Tensor, density: float) -> Tensor:
    """:func:`keep_top_magnitude` on each of ``tensors (N, *shape)`` on its own, in one pass.

    The same entries are kept (the ``int(density · numel)`` largest per tensor, ties at the threshold
    taken first by position), but nothing is read back to the host: the tie count is compared on the
    device, at the price of an int64 running count per entry. For many small tensors (the cores of a
    batch of modules), not for a whole ``ΔW``.
    """
    check_density(density)
    if density == 1.0:
        return tensors.clone()
    flat = tensors.reshape(tensors.shape[0], -1)  # (N, L)
    k = max(1, int(density * flat.shape[1]))
    magnitude = flat.abs()
    threshold = magnitude.kthvalue(flat.shape[1] - k + 1, dim=1, keepdim=True).values  # (N, 1)
    above = magnitude > threshold
    ties = magnitude == threshold
    missing = k - above.sum(dim=1, keepdim=True)  # (N, 1)
    # when the ties exactly fill the places left, every one has a running count within them
    keep = above | (ties & (ties.cumsum(dim=1) <= missing))
    return (flat * keep).reshape(tensors.shape)


def drop_random(
    tensor: Tensor, density: float, generator: torch.Generator, *, rescale: bool = True
) -> Tensor:
    """Keep each entry with probability ``density`` and divide survivors by ``density`` (DARE).

    ``tensor (*shape)`` → same shape. The Bernoulli draw comes from ``generator`` (on the tensor's
    device), so the same seed gives the same mask. Density 1 returns an unchanged copy and draws
    nothing, which keeps DARE at density 1 identical to linear.
    """
    check_density(density)
    if density == 1.0:
        return tensor.clone()
    keep = torch.bernoulli(torch.full_like(tensor, density), generator=generator)
    kept = tensor * keep
    return kept / density if rescale else kept


def elect_sign(weighted: Tensor, method: SignMethod = "total") -> Tensor:
    """The elected sign of every entry, ``+1`` or ``-1`` (ties go to ``+1``).

    ``weighted (K, *shape)`` → ``(*shape)``. "total": the sign of ``Σ_i w_i τ̂_i`` (the TIES paper's
    mass-weighted vote); "frequency": the sign held by more tasks, ignoring magnitudes.
    """
    if method == "total":
        score = weighted.sum(dim=0)
    elif method == "frequency":
        score = weighted.sign().sum(dim=0)
    else:
        raise ValueError(f"majority sign method must be 'total' or 'frequency', got {method!r}")
    return torch.where(score >= 0, 1.0, -1.0).to(weighted.dtype)


def sign_agreement(tasks: Tensor, sign: Tensor) -> Tensor:
    """Which entries of each task carry the elected sign.

    ``tasks (K, *shape)``, ``sign (*shape)`` → bool ``(K, *shape)``.

    Zero entries (pruned away) never agree, so they never count in the mean.
    """
    return (tasks.sign() == sign) & (tasks != 0)


def disjoint_mean(weighted: Tensor, agrees: Tensor) -> Tensor:
    """Mean over tasks of the entries that agree with the elected sign.

    ``weighted (K, *shape)``, ``agrees`` bool ``(K, *shape)`` → ``(*shape)``; entries no task agrees
    on are 0.
    """
    total = (weighted * agrees).sum(dim=0)
    count = agrees.sum(dim=0).clamp(min=1)
    return total / count


def weighted_sum(tasks: Tensor, weights: Tensor) -> Tensor:
    """``Σ_i w_i τ_i``: ``tasks (K, *shape)``, ``weights (K,)`` or ``(K, *lead)`` → ``(*shape)``."""
    if weights.dim() == 1:  # one GEMM, without a weighted copy of the tasks
        return torch.tensordot(weights.to(tasks.dtype), tasks, dims=1)
    return weight_tasks(tasks, weights).sum(dim=0)


def weight_tasks(tasks: Tensor, weights: Tensor) -> Tensor:
    """``w_i τ_i`` for each task: ``(K, *shape)`` → ``(K, *shape)``; ``weights (K,)`` or ``(K, *lead)``."""
    trailing = [1] * (tasks.dim() - weights.dim())
    return tasks * weights.to(tasks.dtype).reshape(*weights.shape, *trailing)
