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
with every entry a candidate. The sample only decides how fast this is, never the result, so it uses
its own fixed-seed generator.
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
    generator = torch.Generator(device=device).manual_seed(0)
    rows = torch.randint(task.out_features, (sample_size,), generator=generator, device=device)
    cols = torch.randint(task.in_features, (sample_size,), generator=generator, device=device)
    sample = task.delta_entries(rows, cols).abs_().sort().values
    below = 1.0 - k / total  # the fraction of entries under the cut
    # 4 standard errors of a sample quantile, plus two places for rounding: a miss costs a second
    # pass, never a wrong result.
    margin = 4.0 * math.sqrt(below * (1.0 - below) / sample_size) + 2.0 / sample_size
    lo = math.floor((below - margin) * sample_size)
    hi = math.ceil((below + margin) * sample_size)
    infinity = torch.tensor(math.inf, device=device)
    low = sample[lo] if lo >= 0 else -infinity
    high = sample[hi] if hi < sample_size else infinity
    return low, high, (min(hi, sample_size - 1) - max(lo, 0) + 1) / sample_size


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


def drop_random_(block: Tensor, density: float, generator: torch.Generator) -> Tensor:
    """DARE's drop in place: zero each entry with probability ``1 − density`` (the ``1/density``
    rescale is the caller's, folded into the block's GEMM). The mask is a bool tensor: a quarter of
    a float mask's memory traffic."""
    drop = torch.empty(block.shape, dtype=torch.bool, device=block.device)
    return block.masked_fill_(drop.bernoulli_(1.0 - density, generator=generator), 0)


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
    disjoint mean). Equals :func:`lorasoup.merging.task_arithmetic.merge_tasks` on the dense tasks;
    DARE draws its masks block by block (task order within a block), so a seed gives one result.
    ``block_elements``: entries per row block (default :data:`BLOCK_ELEMENTS`, read at call time so a
    benchmark can vary it); DARE's draws depend on it, nothing else does. ``use_kernel``: combine
    each block with :mod:`lorasoup.merging.fused`'s kernel (default: on CUDA with Triton); the
    result is the same either way.
    """
    check_density(density)
    weights = weights.cpu()  # read one by one as Python numbers: no device sync per block
    if sign_method not in ("total", "frequency"):
        raise ValueError(f"majority sign method must be 'total' or 'frequency', got {sign_method!r}")
    out_features, in_features = tasks[0].out_features, tasks[0].in_features
    device = tasks[0].A.device
    blocks = row_blocks(out_features, in_features, block_elements or BLOCK_ELEMENTS)
    kernel = fused.available(device) if use_kernel is None else use_kernel
    cuts = None
    if sparsify == "magnitude" and density < 1.0:
        k = max(1, int(density * out_features * in_features))
        cuts = [unchecked_cut(task, k, blocks, use_kernel=kernel) for task in tasks]
        missed = torch.stack([~cut.ok for cut in cuts]).tolist()  # the one read of the cuts
        cuts = [
            exact_cut(t, k, blocks) if miss else c for t, c, miss in zip(tasks, cuts, missed, strict=True)
        ]
    dropping = sparsify == "random" and density < 1.0
    # Scalars folded into each block's GEMM, and what the combine step still multiplies by: the
    # magnitude cut is on |τ_i| itself, so those tasks are weighted after trimming.
    folded = [1.0 if cuts else float(w) / (density if dropping else 1.0) for w in weights]
    after = [float(w) if cuts else 1.0 for w in weights]
    if kernel:
        kernel_weights = torch.tensor(after, dtype=torch.float32, device=device)
        kernel_cuts = None
        if cuts is not None:
            kernel_cuts = (
                torch.stack([cut.threshold for cut in cuts]),
                torch.stack([cut.last_equal for cut in cuts]),
            )
    merged = torch.empty(out_features, in_features, dtype=torch.float32, device=device)
    widest = max(stop - start for start, stop in blocks)
    buffer = torch.empty(len(tasks), widest, in_features, dtype=torch.float32, device=device)
    for start, stop in blocks:
        parts = buffer[:, : stop - start]
        for i, task in enumerate(tasks):
            task.delta_rows(start, stop, times=folded[i], out=parts[i])
            if cuts is not None and not kernel:
                trim_(parts[i], cuts[i], start * in_features)
            elif dropping:
                drop_random_(parts[i], density, generator)
        target = merged[start:stop]
        if kernel:
            fused.combine(
                parts,
                kernel_cuts,
                kernel_weights,
                target,
                first=start * in_features,
                consensus=consensus == "sign",
                frequency=sign_method == "frequency",
            )
            continue
        weighted = [part.mul_(w) if w != 1.0 else part for part, w in zip(parts, after, strict=True)]
        if consensus == "sign":
            _disjoint_mean_into(target, weighted, sign_method)
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
