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
   (about 2 % of the entries);
3. the threshold is an order statistic of those candidates; if the bracket missed (the count shows
   it), the pass is repeated with every entry a candidate.

The sample only decides how fast this is, never the result, so it uses its own fixed-seed generator.
Entries equal to the threshold are kept in row-major order until exactly ``k`` survive, as
:func:`lorasoup.merging.ops.keep_top_magnitude` does on a whole tensor.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

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
    """Keep entries with ``|τ| > threshold``, and the first ``keep_equal`` of the ``equal`` entries
    with ``|τ| == threshold`` (row-major order): exactly ``k`` in all. ``threshold`` is 0-dim."""

    threshold: Tensor
    keep_equal: int
    equal: int


def magnitude_cut(
    task: LoraFactors,
    k: int,
    blocks: Sequence[tuple[int, int]],
    *,
    sample_size: int = SAMPLE_SIZE,
    use_kernel: bool | None = None,
) -> MagnitudeCut:
    """The exact cut keeping the ``k`` largest ``|ΔW_ij|`` of ``task`` (``1 ≤ k ≤ out·in``).

    ``use_kernel``: count and collect with :func:`lorasoup.merging.fused.count_and_collect` (default:
    on CUDA with Triton; no host read per block); the cut is the same either way.
    """
    total = task.out_features * task.in_features
    if not 1 <= k <= total:
        raise ValueError(f"k must be in [1, {total}], got {k}")
    bracket = _bracket(task, k, sample_size) if 4 * sample_size < total else None
    counted = None
    if bracket is not None and (fused.available(task.A.device) if use_kernel is None else use_kernel):
        low, high, share = bracket  # room for twice the expected candidates: overflow means a redo
        counted = fused.count_and_collect(task, blocks, low, high, capacity=int(2 * share * total) + 65536)
    if counted is not None:
        above, pool = counted
    else:
        above, pool = _count_and_collect(task, blocks, bracket)
    need = k - above
    if not 1 <= need <= pool.numel():  # the sample's bracket missed the cut: redo it exactly
        return magnitude_cut(task, k, blocks, sample_size=total, use_kernel=use_kernel)
    threshold = _kth_largest(pool, need)
    greater = above + int((pool > threshold).sum())
    return MagnitudeCut(threshold=threshold, keep_equal=k - greater, equal=int((pool == threshold).sum()))


def _count_and_collect(
    task: LoraFactors, blocks: Sequence[tuple[int, int]], bracket: tuple[Tensor, Tensor, float] | None
) -> tuple[int, Tensor]:
    """Entries of ``|ΔW|`` above the bracket (a count) and inside it (their values, any order);
    without a bracket, every entry is a candidate."""
    above = torch.zeros((), dtype=torch.int64, device=task.A.device)
    candidates = []
    for start, stop in blocks:
        magnitude = task.delta_rows(start, stop).abs_().reshape(-1)
        if bracket is None:
            candidates.append(magnitude)
            continue
        low, high, _ = bracket
        above += (magnitude > high).sum()
        candidates.append(magnitude[(magnitude >= low) & (magnitude <= high)])
        del magnitude
    return int(above), torch.cat(candidates)


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


def _kth_largest(values: Tensor, n: int) -> Tensor:
    """The ``n``-th largest entry of a 1-D tensor, 0-dim."""
    if values.is_cuda:  # CUDA's kthvalue runs one thread block per slice; a sort uses the whole card
        return values.sort().values[values.numel() - n]
    return values.kthvalue(values.numel() - n + 1).values


class _Trim:
    """Applies a :class:`MagnitudeCut` to successive row blocks of one task, in place."""

    def __init__(self, cut: MagnitudeCut) -> None:
        self.cut = cut
        self.quota = cut.keep_equal  # equal-to-threshold entries still to keep
        self.simple = cut.keep_equal == cut.equal  # no surplus ties: |τ| >= threshold is the rule

    def __call__(self, block: Tensor) -> Tensor:
        magnitude = block.abs()
        if self.simple:  # one comparison suffices
            return block.masked_fill_(magnitude < self.cut.threshold, 0)
        drop = magnitude < self.cut.threshold
        equal = (magnitude == self.cut.threshold).reshape(-1)
        del magnitude
        if self.quota > 0:
            kept = equal & (equal.cumsum(0) <= self.quota)
            self.quota -= int(kept.sum())
            equal &= ~kept
        drop |= equal.view(block.shape)
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
    trims = None
    if sparsify == "magnitude" and density < 1.0:
        k = max(1, int(density * out_features * in_features))
        trims = [_Trim(magnitude_cut(task, k, blocks, use_kernel=kernel)) for task in tasks]
    dropping = sparsify == "random" and density < 1.0
    # Scalars folded into each block's GEMM, and what the combine step still multiplies by: the
    # magnitude cut is on |τ_i| itself, so those tasks are weighted after trimming.
    folded = [1.0 if trims else float(w) / (density if dropping else 1.0) for w in weights]
    after = [float(w) if trims else 1.0 for w in weights]
    if kernel:
        kernel_weights = torch.tensor(after, dtype=torch.float32, device=device)
        kernel_cuts = None
        if trims is not None:  # tasks with surplus ties at the cut are trimmed before, exactly
            cuts = [t.cut.threshold if t.simple else torch.zeros(()) for t in trims]
            kernel_cuts = torch.stack([c.float().to(device) for c in cuts])
    merged = torch.empty(out_features, in_features, dtype=torch.float32, device=device)
    widest = max(stop - start for start, stop in blocks)
    buffer = torch.empty(len(tasks), widest, in_features, dtype=torch.float32, device=device)
    for start, stop in blocks:
        parts = buffer[:, : stop - start]
        for i, task in enumerate(tasks):
            task.delta_rows(start, stop, times=folded[i], out=parts[i])
            if trims is not None and not (kernel and trims[i].simple):
                trims[i](parts[i])
            elif dropping:
                drop_random_(parts[i], density, generator)
        target = merged[start:stop]
        if kernel:
            fused.combine(
                parts,
                kernel_cuts,
                kernel_weights,
                target,
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
