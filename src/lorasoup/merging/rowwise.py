"""The ΔW-space merges (TIES, DARE, magnitude pruning) computed one block of rows at a time.

Every step of the family is elementwise once each task's magnitude threshold is known, so the merged
``ΔW (out, in)`` of a module is built block by block: rows ``start:stop`` of each task ``τ_i = s_i B_i
A_i`` are made from the factors, sparsified, weighted and combined, and written into the one output
tensor. Memory is that output plus a few blocks (``K + 3`` of ``block_elements`` entries), whatever K
and the module's size; no task is ever densified whole.

The threshold of magnitude trimming (the ``k``-th largest ``|τ_ij|``) is found exactly without
holding a whole task either:

1. a random sample of entries (``ΔW_ij`` from the factors in ``O(r)`` each) brackets the cut
   ``[low, high]`` with a margin of several standard errors of the sample quantile;
2. one pass over the blocks counts entries above ``high`` and keeps those inside the bracket
   (about 1 % of the entries) as int64 keys: the float's bits above, its row-major position (counted
   down) below, so that keys order entries by magnitude and then by position, first first;
3. the cut is the key of order ``k − above`` among those: its magnitude is the threshold, its
   position the last entry equal to the threshold that is kept. Entries equal to the threshold are
   kept in row-major order until exactly ``k`` survive, as
   :func:`lorasoup.merging.ops.keep_top_magnitude` does on a whole tensor. (On a 7B MLP module's
   45M fp32 entries the threshold is usually shared by a few entries: ties are the common case.)

None of this reads the device: a cut carries a 0-dim ``ok`` that is False when the bracket missed
(the count shows it), and :func:`merge_rowwise` reads its tasks' flags once, redoing a missed cut
with every entry a candidate. The sample only decides how fast this is, never the result, so it is
not random at all: a golden-ratio (Weyl) sequence of positions, spread evenly over the module and the
same every time, which also lets the whole cut run inside a captured CUDA graph.

DARE's random drop is a hash of (seed, task, position) rather than a draw from a generator
(:func:`dare_keep`): the mask of an entry does not depend on the block it falls in, on the device, or
on whether the fused kernel computes it on the fly (it does, on a GPU, so the mask is never stored).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from lorasoup.adapters import LoraFactors
from lorasoup.merging import fused
from lorasoup.merging.ops import SignMethod, check_density

BLOCK_ELEMENTS = 1 << 22
"""Entries per block (16 MiB in fp32): small next to a 7B module's ΔW (45M entries), large enough
that a GPU's kernels stay busy."""
SAMPLE_SIZE = 1 << 17
"""Entries sampled to bracket a magnitude threshold; tasks this small or smaller are cut exactly."""


def row_blocks(n_rows: int, n_cols: int, block_elements: int = BLOCK_ELEMENTS) -> list[tuple[int, int]]:
    """``[(start, stop), ...]`` covering ``range(n_rows)`` with about ``block_elements`` entries each."""
    step = max(1, block_elements // max(1, n_cols))
    return [(start, min(start + step, n_rows)) for start in range(0, n_rows, step)]


@dataclass(frozen=True)
class MagnitudeCut:
    """Keep entries with ``|τ| > threshold``, and those with ``|τ| == threshold`` at row-major positions
    up to ``last_equal`` (``-1``: none of them): exactly ``k`` in all. All fields are 0-dim tensors on
    the task's device; ``ok`` is False when a sampled bracket missed the cut (then the rest is
    meaningless and the cut must be redone exactly)."""

    threshold: Tensor  # float32
    last_equal: Tensor  # int64
    ok: Tensor  # bool


POSITION_BITS = 32
"""Low bits of a candidate key holding ``2³² − 1 − position``: modules up to 2³² entries."""
LOW_MASK = (1 << POSITION_BITS) - 1


def magnitude_cut(
    task: LoraFactors, k: int, blocks: Sequence[tuple[int, int]], **options: Any
) -> MagnitudeCut:
    """:func:`unchecked_cut`, checked: reads ``ok`` from the device and redoes a miss exactly.
    :func:`merge_rowwise` batches that read over its tasks instead."""
    cut = unchecked_cut(task, k, blocks, **options)
    return cut if bool(cut.ok) else exact_cut(task, k, blocks)


def unchecked_cut(
    task: LoraFactors,
    k: int,
    blocks: Sequence[tuple[int, int]],
    *,
    sample_size: int | None = None,
    use_kernel: bool | None = None,
) -> MagnitudeCut:
    """The exact cut keeping the ``k`` largest ``|ΔW_ij|`` of ``task`` (``1 ≤ k ≤ out·in``), without
    reading the device: check ``ok`` (False: call :func:`exact_cut`).

    ``sample_size`` defaults to :data:`SAMPLE_SIZE`, read at call time. ``use_kernel``: count and
    collect with :func:`lorasoup.merging.fused.count_and_collect` (default: on CUDA with Triton); the
    cut is the same either way.
    """
    sample_size = sample_size or SAMPLE_SIZE
    total = task.out_features * task.in_features
    if not 1 <= k <= total:
        raise ValueError(f"k must be in [1, {total}], got {k}")
    if total > LOW_MASK:
        raise ValueError(f"modules of more than {LOW_MASK} entries are not supported, got {total}")
    if 4 * sample_size >= total:  # small enough to take every entry as a candidate
        return exact_cut(task, k, blocks)
    low, high, share = _bracket(task, k, sample_size)
    if fused.available(task.A.device) if use_kernel is None else use_kernel:
        # room for twice the expected candidates: an overflow shows as a miss, and the cut is redone
        capacity = int(2 * share * total) + 65536
        keys, counts = fused.count_and_collect(task, blocks, low, high, capacity=capacity)
    else:
        keys, counts = _count_and_collect(task, blocks, (low, high))
    return _cut_from_keys(keys, counts, k)


def exact_cut(task: LoraFactors, k: int, blocks: Sequence[tuple[int, int]]) -> MagnitudeCut:
    """The cut with every entry a candidate (a key per entry: for small tasks, or after a miss)."""
    keys, counts = _count_and_collect(task, blocks, None)
    return _cut_from_keys(keys, counts, k)


def _count_and_collect(
    task: LoraFactors, blocks: Sequence[tuple[int, int]], bracket: tuple[Tensor, Tensor] | None
) -> tuple[Tensor, Tensor]:
    """Keys of the entries of ``|ΔW|`` inside the bracket (any order; without a bracket, every entry)
    and ``counts (2,)`` int64: entries above the bracket, keys collected."""
    device = task.A.device
    above = torch.zeros((), dtype=torch.int64, device=device)
    keys = []
    for start, stop in blocks:
        magnitude = task.delta_rows(start, stop).abs_().reshape(-1)
        first = start * task.in_features
        if bracket is None:
            positions = torch.arange(first, first + magnitude.numel(), device=device)
        else:
            low, high = bracket
            above += (magnitude > high).sum()
            local = ((magnitude >= low) & (magnitude <= high)).nonzero().squeeze(1)
            magnitude, positions = magnitude.index_select(0, local), local.add_(first)
        keys.append(candidate_keys(magnitude, positions))
        del magnitude, positions
    collected = torch.cat(keys)
    counts = torch.stack([above, torch.tensor(collected.numel(), device=device)])
    return collected, counts


def candidate_keys(magnitude: Tensor, positions: Tensor) -> Tensor:
    """int64 keys ordering entries by ``magnitude (n,)`` (float32, ``>= 0``: its bits order as
    integers), then by row-major ``positions (n,)``, earlier first: ``bits << 32 | (2³² − 1 − pos)``."""
    bits = magnitude.view(torch.int32).to(torch.int64)
    return (bits << POSITION_BITS) | (LOW_MASK - positions)


def _cut_from_keys(keys: Tensor, counts: Tensor, k: int) -> MagnitudeCut:
    """The cut from candidate ``keys (n,)`` (unused slots ``< 0``) and ``counts (2,)`` [above, collected]:
    the key of order ``need = k − above`` from the top is the last entry kept."""
    above, collected = counts[0], counts[1]
    need = k - above
    ordered = keys.sort().values  # ascending: the unused slots first
    if not keys.numel():  # nothing inside the bracket: a miss
        ordered = torch.zeros(1, dtype=torch.int64, device=keys.device)
    # index_select, not ordered[slot]: a 0-dim index tensor would be read on the host
    slot = (ordered.numel() - need).clamp(0, ordered.numel() - 1).reshape(1)
    last_kept = ordered.index_select(0, slot).reshape(())
    threshold = (last_kept >> POSITION_BITS).to(torch.int32).view(torch.float32)
    last_equal = LOW_MASK - (last_kept & LOW_MASK)
    ok = (need >= 1) & (need <= collected) & (collected <= keys.numel())
    return MagnitudeCut(threshold=threshold, last_equal=last_equal, ok=ok)


def _bracket(task: LoraFactors, k: int, sample_size: int) -> tuple[Tensor, Tensor, float]:
    """``(low, high, share)`` around the ``k``-th largest ``|ΔW_ij|``, from a sample of entries;
    ``share`` is the sample's fraction inside the bracket."""
    total = task.out_features * task.in_features
    device = task.A.device
    positions = sample_positions(total, sample_size, device)
    sample = task.delta_entries(positions // task.in_features, positions % task.in_features).abs_()
    sample = sample.sort().values
    below = 1.0 - k / total  # the fraction of entries under the cut
    # 4 standard errors of a sample quantile, plus two places for rounding: a miss costs a second
    # pass, never a wrong result.
    margin = 4.0 * math.sqrt(below * (1.0 - below) / sample_size) + 2.0 / sample_size
    lo = math.floor((below - margin) * sample_size)
    hi = math.ceil((below + margin) * sample_size)
    # torch.full, not torch.tensor: a fill kernel, where a copy from the host could not be captured
    low = sample[lo] if lo >= 0 else torch.full((), -math.inf, device=device)
    high = sample[hi] if hi < sample_size else torch.full((), math.inf, device=device)
    return low, high, (min(hi, sample_size - 1) - max(lo, 0) + 1) / sample_size


def sample_positions(total: int, size: int, device: torch.device) -> Tensor:
    """``size`` distinct row-major positions in ``range(total)`` (``size ≤ total``), evenly spread:
    ``j · step mod total`` with ``step ≈ total / φ`` coprime to ``total`` (a Weyl sequence)."""
    step = max(1, round(total * (math.sqrt(5.0) - 1.0) / 2.0))
    while math.gcd(step, total) != 1:
        step += 1
    return torch.arange(size, dtype=torch.int64, device=device).mul_(step).remainder_(total)


UINT32 = (1 << 32) - 1


def mix32(x: Any) -> Any:
    """A 32-bit integer hash (the "lowbias32" mixer of xorshifts and odd multiplies) of ``x``: an int64
    tensor holding values in ``[0, 2³²)``, elementwise, or a Python int. A bijection whose outputs
    look uniform. The multiplications go through 16-bit halves so that nothing overflows int64; the
    Triton kernel computes the same in uint32 arithmetic."""
    x = x ^ (x >> 16)
    x = _times32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _times32(x, 0x846CA68B)
    return x ^ (x >> 16)


def _times32(x: Any, multiplier: int) -> Any:
    """``x · multiplier mod 2³²`` for ``x, multiplier < 2³²``, by 16-bit halves (products < 2⁴⁸)."""
    return ((x & 0xFFFF) * multiplier + (((x >> 16) * multiplier & 0xFFFF) << 16)) & UINT32


def dare_task_keys(generator: torch.Generator, count: int) -> list[int]:
    """One 32-bit key per task for :func:`dare_keep`, from the generator's seed (read on the host: a
    module's masks are fixed by ``initial_seed()``, whatever was drawn from it before). Python
    integers: no tensor operations per module."""
    seed = generator.initial_seed()
    base = mix32(seed & UINT32 ^ mix32((seed >> 32) & UINT32))
    return [mix32(base ^ (i * 0x9E3779B9 & UINT32)) for i in range(count)]


def dare_threshold(density: float) -> int:
    """Entries whose hash is below this are kept: a share ``density`` of the 2³² hash values."""
    return min(UINT32, round(density * 2.0**32))


def dare_keep(positions: Tensor, key: int, threshold: int) -> Tensor:
    """DARE's mask: which entries at row-major ``positions`` (int64, ``< 2³²``) a task of hash ``key``
    keeps. Each entry independently, with probability ``threshold / 2³²``."""
    return mix32(mix32(positions) ^ key) < threshold


def trim_(block: Tensor, cut: MagnitudeCut, first: int) -> Tensor:
    """Apply ``cut`` in place to ``block (rows, in)``, the task's rows whose first entry has row-major
    position ``first``."""
    magnitude = block.abs()
    drop = magnitude < cut.threshold
    equal = magnitude == cut.threshold
    del magnitude
    if bool(equal.any()):  # a host read, but this is the CPU path (a GPU has fused.combine)
        positions = torch.arange(first, first + block.numel(), device=block.device).view(block.shape)
        drop |= equal & (positions > cut.last_equal)
    return block.masked_fill_(drop, 0)


def drop_hashed_(block: Tensor, first: int, key: int, threshold: int) -> Tensor:
    """DARE's drop in place on ``block (rows, in)``, whose first entry has row-major position
    ``first``: the entries :func:`dare_keep` drops are zeroed (the ``1/density`` rescale is the
    caller's, folded into the block's GEMM)."""
    positions = torch.arange(first, first + block.numel(), device=block.device).view(block.shape)
    return block.masked_fill_(~dare_keep(positions, key, threshold), 0)


def merge_rowwise(
    tasks: Sequence[LoraFactors],
    weights: Tensor,
    *,
    sparsify: str,
    consensus: str,
    density: float,
    sign_method: SignMethod,
    generator: torch.Generator,
    block_elements: int | None = None,
    use_kernel: bool | None = None,
) -> Tensor:
    """One module's merged ``ΔW (out, in)`` (fp32) from K tasks given as factors; ``weights (K,)``.

    ``sparsify``: "none" | "magnitude" (top ``density`` by ``|τ|``) | "random" (DARE);
    ``consensus``: "none" (weighted sum) | "sign" (TIES' elected sign, signs elected on ``w_i τ̂_i``,
    disjoint mean). Equals :func:`lorasoup.merging.delta.merge_tasks` on the dense tasks,
    except that DARE's masks are :func:`dare_keep`'s hash of the ``generator``'s seed, the task and
    the position (the same on every device and for every block size). ``block_elements``: entries per
    row block (default :data:`BLOCK_ELEMENTS`, read at call time so a benchmark can vary it).
    ``use_kernel``: combine each block with :mod:`lorasoup.merging.fused`'s kernel (default: on CUDA
    with Triton); the result is the same either way.
    """
    plan = plan_rows(
        tasks,
        weights.tolist(),  # one read of the weights, as Python numbers
        sparsify=sparsify,
        consensus=consensus,
        density=density,
        sign_method=sign_method,
        generator=generator,
        block_elements=block_elements,
        use_kernel=use_kernel,
    )
    cuts = None
    if plan.keep is not None:
        cuts = [unchecked_cut(task, plan.keep, plan.blocks, use_kernel=plan.kernel) for task in tasks]
        missed = torch.stack([~cut.ok for cut in cuts]).tolist()  # the one read of the cuts
        cuts = [
            exact_cut(t, plan.keep, plan.blocks) if miss else c
            for t, c, miss in zip(tasks, cuts, missed, strict=True)
        ]
    return combine_rows(tasks, plan, cuts)


@dataclass(frozen=True)
class RowPlan:
    """What :func:`combine_rows` does to one module, decided on the host before any device work.

    ``keep``: entries each task keeps by magnitude (``None``: no trimming); ``folded[i]``: the scalar
    folded into task ``i``'s GEMM (DARE's ``w_i / density``; 1 where the cut must see ``|τ_i|``);
    ``after[i]``: the weight the combine step applies (``w_i`` after trimming, else 1); ``dare``:
    ``(task keys, threshold)`` of :func:`dare_keep`, or ``None``.
    """

    blocks: list[tuple[int, int]]
    kernel: bool
    keep: int | None
    folded: tuple[float, ...]
    after: tuple[float, ...]
    dare: tuple[tuple[int, ...], int] | None
    consensus: bool
    frequency: bool


def plan_rows(
    tasks: Sequence[LoraFactors],
    weights: Sequence[float],
    *,
    sparsify: str,
    consensus: str,
    density: float,
    sign_method: SignMethod,
    generator: torch.Generator,
    block_elements: int | None = None,
    use_kernel: bool | None = None,
) -> RowPlan:
    """The :class:`RowPlan` of :func:`merge_rowwise`'s arguments (validated here)."""
    check_density(density)
    if sign_method not in ("total", "frequency"):
        raise ValueError(f"majority sign method must be 'total' or 'frequency', got {sign_method!r}")
    out_features, in_features = tasks[0].out_features, tasks[0].in_features
    trims = sparsify == "magnitude" and density < 1.0
    dropping = sparsify == "random" and density < 1.0
    if dropping and out_features * in_features > LOW_MASK:
        raise ValueError(f"modules of more than {LOW_MASK} entries are not supported")
    return RowPlan(
        blocks=row_blocks(out_features, in_features, block_elements or BLOCK_ELEMENTS),
        kernel=fused.available(tasks[0].A.device) if use_kernel is None else use_kernel,
        keep=max(1, int(density * out_features * in_features)) if trims else None,
        # the magnitude cut is on |τ_i| itself, so those tasks are weighted after trimming
        folded=tuple(1.0 if trims else float(w) / (density if dropping else 1.0) for w in weights),
        after=tuple(float(w) if trims else 1.0 for w in weights),
        dare=(tuple(dare_task_keys(generator, len(tasks))), dare_threshold(density)) if dropping else None,
        consensus=consensus == "sign",
        frequency=sign_method == "frequency",
    )


def combine_rows(
    tasks: Sequence[LoraFactors],
    plan: RowPlan,
    cuts: Sequence[MagnitudeCut] | None,
    *,
    device_weights: Tensor | None = None,
    device_keys: Tensor | None = None,
) -> Tensor:
    """The merged ``ΔW (out, in)`` of ``tasks`` by ``plan``, given each task's magnitude cut (where
    ``plan.keep``). Reads nothing from the device. ``device_weights (K,)`` float32 and
    ``device_keys (K,)`` int64 may hold ``plan.after`` and DARE's keys already on the device (a
    captured graph's buffers); otherwise they are copied there."""
    out_features, in_features = tasks[0].out_features, tasks[0].in_features
    device = tasks[0].A.device
    if plan.kernel:
        if device_weights is None:
            device_weights = torch.tensor(plan.after, dtype=torch.float32, device=device)
        drop = None
        if plan.dare is not None:
            if device_keys is None:
                device_keys = torch.tensor(plan.dare[0], dtype=torch.int64, device=device)
            drop = (device_keys, plan.dare[1])
        kernel_cuts = None
        if cuts is not None:
            kernel_cuts = (
                torch.stack([cut.threshold for cut in cuts]),
                torch.stack([cut.last_equal for cut in cuts]),
            )
    merged = torch.empty(out_features, in_features, dtype=torch.float32, device=device)
    widest = max(stop - start for start, stop in plan.blocks)
    buffer = torch.empty(len(tasks), widest, in_features, dtype=torch.float32, device=device)
    for start, stop in plan.blocks:
        parts = buffer[:, : stop - start]
        first = start * in_features
        for i, task in enumerate(tasks):
            task.delta_rows(start, stop, times=plan.folded[i], out=parts[i])
            if plan.kernel:
                continue
            if cuts is not None:
                trim_(parts[i], cuts[i], first)
            elif plan.dare is not None:
                drop_hashed_(parts[i], first, plan.dare[0][i], plan.dare[1])
        target = merged[start:stop]
        if plan.kernel:
            fused.combine(
                parts,
                kernel_cuts,
                device_weights,
                target,
                first=first,
                consensus=plan.consensus,
                frequency=plan.frequency,
                drop=drop,
            )
            continue
        weighted = [part.mul_(w) if w != 1.0 else part for part, w in zip(parts, plan.after, strict=True)]
        if plan.consensus:
            _disjoint_mean_into(target, weighted, "frequency" if plan.frequency else "total")
        else:
            target.copy_(weighted[0])
            for part in weighted[1:]:
                target.add_(part)
    return merged


def _disjoint_mean_into(target: Tensor, weighted: list[Tensor], sign_method: SignMethod) -> None:
    """TIES' elect-and-average on one block: ``weighted[i]`` is ``w_i τ̂_i`` (modified in place)."""
    score = torch.zeros_like(target)
    for part in weighted:
        score += part if sign_method == "total" else part.sign()
    positive = score >= 0  # ties go to +1
    del score
    count = torch.zeros(
        target.shape, dtype=torch.uint8 if len(weighted) < 256 else torch.int32, device=target.device
    )
    target.zero_()
    for part in weighted:
        agrees = torch.where(positive, part > 0, part < 0)  # zeros never agree
        count += agrees
        target.add_(part.masked_fill_(~agrees, 0))
    target.div_(count.clamp_(min=1))
