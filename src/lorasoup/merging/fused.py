"""GPU kernels (Triton) for the elementwise work of the ΔW-space merges, one launch per row block.

:func:`count_and_collect` is the counting pass of the exact magnitude cut; :func:`combine` the
elementwise end of a merge.

The torch path of :func:`lorasoup.merging.rowwise.merge_rowwise` trims, weights, votes, checks
agreement, counts and divides in about 20 separate passes over each block of K task rows;
:func:`combine` reads the K blocks once to vote and once to average (once in all without sign
consensus) and writes the merged block once. It performs the same floating-point operations in the
same order as the torch path, with FMA contraction off, so the two agree bit for bit; the counting
pass collects the same candidates in another order, which gives the same cut (both tested on a GPU).

Used on CUDA tensors when Triton is importable (it ships with PyTorch's CUDA wheels); everything
else takes the torch path. The kernels themselves live in ``_triton_kernels`` (imported on first
use); the tests also run them through Triton's interpreter on CPU tensors.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

BLOCK = 1024


def available(device: torch.device) -> bool:
    """Whether :func:`combine` can run on ``device``."""
    return device.type == "cuda" and importlib.util.find_spec("triton") is not None


def combine(
    tasks: Tensor,
    cuts: tuple[Tensor, Tensor] | None,
    weights: Tensor,
    out: Tensor,
    *,
    first: int,
    consensus: bool,
    frequency: bool,
    drop: tuple[Tensor, int] | None = None,
) -> Tensor:
    """Merge one row block: ``tasks (K, rows, in)`` (any stride between tasks, rows contiguous) →
    ``out (rows, in)``.

    ``cuts``: ``(thresholds (K,) float32, last_equal (K,) int64)`` of each task's
    :class:`lorasoup.merging.rowwise.MagnitudeCut`, or ``None`` (no trimming): an entry is zeroed when
    ``|x| < threshold``, or ``|x| == threshold`` at a row-major position past ``last_equal`` (the
    block's first entry is at position ``first``). Then entries are multiplied by ``weights[k]``;
    without ``consensus`` the results are summed, with it TIES' sign is elected (their sum, or with
    ``frequency`` the sum of their signs; ties go to +1) and the entries carrying it are averaged.
    ``drop``: ``(keys (K,) int64, threshold)`` of DARE's hashed mask (``rowwise.dare_keep``),
    computed here on the fly, instead of trimming. ``tasks`` is only read.
    """
    count, rows, columns = tasks.shape
    if tasks.stride(2) != 1 or tasks.stride(1) != columns or not out.is_contiguous():
        raise ValueError("combine needs each task's rows contiguous and a contiguous output")
    n = rows * columns
    if cuts is not None and drop is not None:
        raise ValueError("combine trims by magnitude or drops at random, not both")
    thresholds, last_equal = cuts if cuts is not None else (weights, _unused_positions(weights))
    keys, keep_below = drop if drop is not None else (last_equal, 0)
    _kernel()[_grid(n)](
        tasks,
        thresholds,
        last_equal,
        weights,
        keys,
        keep_below,
        out,
        n,
        first,
        tasks.stride(0),
        K=count,
        TRIM=cuts is not None,
        DROP=drop is not None,
        CONSENSUS=consensus,
        FREQUENCY=frequency,
        BLOCK=BLOCK,
        enable_fp_fusion=False,  # a*b+c rounded twice, as torch's separate mul and add do
    )
    return out


def count_and_collect(
    task: Any, blocks: Sequence[tuple[int, int]], low: Tensor, high: Tensor, *, capacity: int
) -> tuple[Tensor, Tensor]:
    """The counting pass of the exact magnitude cut (``rowwise.unchecked_cut``) on the GPU.

    For each row block of ``task``'s ``|ΔW|``: entries above ``high`` are counted, and those in
    ``[low, high]`` appended to one buffer as ``rowwise.candidate_keys`` (in no particular order: only
    their order statistics matter), by atomics instead of a boolean index. Nothing is read back:
    returns ``keys (capacity,)`` int64 (unused slots ``-1``) and ``counts (2,)`` int64 [above,
    collected]; ``collected > capacity`` means some keys were lost and the cut reports a miss.
    """
    device = task.A.device
    widest = max(stop - start for start, stop in blocks)
    block = torch.empty(widest, task.in_features, dtype=torch.float32, device=device)
    keys = torch.full((capacity,), -1, dtype=torch.int64, device=device)
    counters = torch.zeros(2, dtype=torch.int32, device=device)  # above, collected (< 2³¹ per module)
    kernel = _collect_kernel()
    bounds = (low.float().reshape(1), high.float().reshape(1))
    for start, stop in blocks:
        rows = block[: stop - start]
        task.delta_rows(start, stop, out=rows)
        first = start * task.in_features
        kernel[_grid(rows.numel())](rows, rows.numel(), first, *bounds, keys, counters, capacity, BLOCK=BLOCK)
    return keys, counters.long()


def _unused_positions(like: Tensor) -> Tensor:
    """A placeholder int64 argument where the kernel does not trim."""
    return torch.zeros(like.shape, dtype=torch.int64, device=like.device)


def _grid(n: int) -> tuple[int]:
    """One program per ``BLOCK`` entries."""
    return (-(-n // BLOCK),)


def _collect_kernel() -> Any:
    from lorasoup.merging import _triton_kernels  # imports Triton: only when a kernel runs

    return _triton_kernels.count_and_collect


def _kernel() -> Any:
    from lorasoup.merging import _triton_kernels

    return _triton_kernels.merge_block
