"""The core-space merges streamed in batches: the modules of one run grouped by signature.

Merged one at a time, a module's core-space merge costs almost nothing in arithmetic
(``O((out + in)·R²)``) but a long row of small steps: two thin QRs, two ``R × R`` SVDs each with a
device → host → device round trip, the cores, the combine, the map back. On an H100 a 7B adapter
pair (160 modules) took 0.7–0.8 s that way, about 5 ms a module of latency, whatever the method.
Those 160 modules come in three shapes, so :class:`BatchedCoreMerge` buffers the modules submitted
and merges each group of modules with one signature (``out``, ``in``, the ranks of the adapters that
take part, the result's dtype, the device and the parameters) through the very functions the
per-module merge runs on a batch of one (``core_space.core_space``, the method's ``CoreMerge``,
``CoreSpace.to_update``), with a leading group dimension ``G``:

1. the factors stacked per side, ``(G, out, R)`` and ``(G, R, in)`` in float64, and each side's bases
   by one batched thin QR, the ``2G`` small triangular factors of both sides then SVD'd in one host
   call (``subspace.column_bases``);
2. the cores ``(G, K, m, n)`` and the combine: ``core_linear`` one contraction, the TIES / DARE
   presets ``delta.merge_task_batch`` (each module's tasks trimmed on their own, with no read back;
   DARE's draws from each module's own generator, in the per-module order, so the masks are the
   per-module path's), ``core_tsv`` one batched SVD of all ``G·K`` cores and batched polar factors;
3. the map back, and the copy to the host: every group of one flush into **one** pinned buffer,
   without waiting (:meth:`BatchedCoreMerge.finish` waits once, after its last copy). With ``rank`` /
   ``energy`` each module is recompressed on its own (its rank depends on its own singular values),
   then copied.

Scales and weights are per module, so modules where an adapter is absent or weighted 0 join the
group of the adapters that remain. The results are the per-module merge's up to float64 round-off
(the bases' signs may differ, which changes no update: see ``core_space``), returned in the order
submitted. Memory: the buffered modules' factors stay where the runner put them until their group is
merged; when they reach ``max_bytes`` (as stored), every buffered group is merged, so the device holds
at most that much buffered input plus the float64 working copies of one group (a few times its
share of it).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from lorasoup.adapters import LoraFactors
from lorasoup.merging.base import MergeParams, ModuleMerge
from lorasoup.merging.tsv import finish, taking_part

MAX_BYTES = 64 * 2**20
"""Buffered factor bytes that start a flush (see the module docstring)."""

Finished = list[tuple[str, ModuleMerge]]

GroupMerge = Callable[
    [Sequence[Sequence[LoraFactors]], Tensor, MergeParams, Sequence[torch.Generator]], tuple[Tensor, Tensor]
]
"""``(modules[g][i], weights (G, K), params, one generator per module) → A (G, k, in), B (G, out, k)``:
one method's ``core_space.merge_cores``."""


@dataclass(frozen=True)
class _Module:
    """A submitted module waiting for its group: the adapters that take part and their weights."""

    name: str
    active: list[LoraFactors]
    weights: list[float]
    params: MergeParams
    generator: torch.Generator
    dtype: torch.dtype

    @property
    def device(self) -> torch.device:
        return self.active[0].A.device

    def signature(self) -> tuple:
        """What a group shares: whatever fixes the stacked shapes, the device, the dtype and the combine."""
        first = self.active[0]
        ranks = tuple(f.rank for f in self.active)
        return (first.out_features, first.in_features, ranks, self.dtype, self.device, self.params)


class BatchedCoreMerge:
    """A :class:`lorasoup.merging.base.StreamingMerge` of one core-space method: the modules of one
    run go through :meth:`submit` and :meth:`finish`; each result is ``merge_in_core_space``'s (see
    the module docstring), ``A`` and ``B`` on the host. Works on any device (the runner uses it on
    CUDA, where it pays; on a CPU it checks the batching)."""

    def __init__(self, merge_group: GroupMerge, *, max_bytes: int = MAX_BYTES) -> None:
        self.merge_group, self.max_bytes = merge_group, max_bytes
        self.queue: list[_Module | tuple[str, ModuleMerge]] = []  # in the order submitted
        self.buffered = 0  # bytes of the queued modules' factors
        self.stats = {"groups": 0, "modules": 0}

    def submit(
        self,
        name: str,
        factors: Sequence[LoraFactors | None],
        weights: Tensor,
        params: MergeParams,
        generator: torch.Generator,
    ) -> Finished:
        """Queue module ``name``; returns every queued module, merged, when the buffer is full."""
        active, numbers, dtype, zero = taking_part(factors, weights)
        if zero is not None:
            self.queue.append((name, _on_host(zero)))
            return []
        self.queue.append(_Module(name, active, numbers, params, generator, dtype))
        self.buffered += sum(t.numel() * t.element_size() for f in active for t in (f.A, f.B))
        return self.finish() if self.buffered >= self.max_bytes else []

    def finish(self) -> Finished:
        """Merge every queued module, group by group; returns them in the order submitted."""
        queue, self.queue, self.buffered = self.queue, [], 0
        groups: dict[tuple, list[int]] = {}
        for index, item in enumerate(queue):
            if isinstance(item, _Module):
                groups.setdefault(item.signature(), []).append(index)
        done = {i: item for i, item in enumerate(queue) if not isinstance(item, _Module)}
        staged: list[tuple[list[int], list[_Module], Tensor, Tensor]] = []  # whole groups, for the host
        for indices in groups.values():
            modules: list[_Module] = [queue[i] for i in indices]  # type: ignore[misc]
            merged = self._merge_group(modules)
            if isinstance(merged, tuple):
                staged.append((indices, modules, *merged))
                continue
            for index, module, result in zip(indices, modules, merged, strict=True):
                done[index] = (module.name, result)
        landed = _copy_to_host([t for _, _, A, B in staged for t in (A, B)])
        for (indices, modules, _, _), A, B in zip(staged, landed[::2], landed[1::2], strict=True):
            params, dtype = modules[0].params, modules[0].dtype
            for index, module, a, b in zip(indices, modules, A, B, strict=True):
                done[index] = (module.name, finish(a, b, params, dtype))  # views of the landed copy
        for device in {queue[indices[0]].device for indices in groups.values()}:  # type: ignore[union-attr]
            if device.type == "cuda":  # every copy to the host has landed before anyone reads it
                torch.cuda.current_stream(device).synchronize()
        return [done[i] for i in range(len(queue))]

    def _merge_group(self, modules: Sequence[_Module]) -> list[ModuleMerge] | tuple[Tensor, Tensor]:
        """Steps 1–3 of the module docstring for modules of one signature: the group's ``A (G, k, in)``
        and ``B (G, out, k)`` in the result's dtype, still on the device, for :meth:`finish` to copy to
        the host with the other groups; or, recompressed module by module (``rank`` / ``energy``),
        each module's result on the host."""
        self.stats["groups"] += 1
        self.stats["modules"] += len(modules)
        params, dtype = modules[0].params, modules[0].dtype
        weights = torch.tensor([m.weights for m in modules], dtype=torch.float64)  # (G, K)
        generators = [m.generator for m in modules]
        A, B = self.merge_group(
            [m.active for m in modules], weights, params, generators
        )  # (G, k, in), (G, out, k)
        if params.rank is None and params.energy is None:
            return A.to(dtype), B.to(dtype)
        return [_on_host(finish(a, b, params, dtype)) for a, b in zip(A, B, strict=True)]


def _copy_to_host(tensors: Sequence[Tensor]) -> list[Tensor]:
    """Copies on the host of ``tensors`` (a flush's groups, on one device) that have not landed yet
    where they are on CUDA: each into a slice of **one** pinned buffer per dtype, at the link's
    bandwidth. On an H100, for a 7B pair's core TIES (160 modules, 0.44 GB of merged fp32 factors), a
    blocking ``.cpu()`` (pageable memory) held ~0.24 of its 0.45 s; a pinned copy per group, 0.25 s of
    page-locking in 40 ``cudaHostAlloc`` calls (each rounded up to a power of two by torch's caching
    host allocator) of the 0.35 s left. Host tensors come back as they are."""
    if not tensors or tensors[0].device.type != "cuda":
        return list(tensors)
    return into_host_buffers(tensors, pinned)


def pinned(dtype: torch.dtype, numel: int) -> Tensor:
    """The host buffer :func:`_copy_to_host` lands a flush in (``bench/core_merge.py --host-copy``
    swaps it to time other kinds)."""
    return torch.empty(numel, dtype=dtype, pin_memory=True)


def into_host_buffers(
    tensors: Sequence[Tensor], allocate: Callable[[torch.dtype, int], Tensor]
) -> list[Tensor]:
    """``tensors`` copied (without waiting, where the buffer is pinned) into one host buffer per dtype,
    ``allocate(dtype, numel)``: views of it, in order."""
    totals: dict[torch.dtype, int] = {}
    for tensor in tensors:
        totals[tensor.dtype] = totals.get(tensor.dtype, 0) + tensor.numel()
    buffers = {dtype: allocate(dtype, n) for dtype, n in totals.items()}
    starts = dict.fromkeys(totals, 0)
    landed = []
    for tensor in tensors:
        start = starts[tensor.dtype]
        view = buffers[tensor.dtype][start : start + tensor.numel()].view(tensor.shape)
        view.copy_(tensor, non_blocking=True)
        landed.append(view)
        starts[tensor.dtype] = start + tensor.numel()
    return landed


def _on_host(result: ModuleMerge) -> ModuleMerge:
    return ModuleMerge(A=result.A.cpu(), B=result.B.cpu(), discarded_energy=result.discarded_energy)
