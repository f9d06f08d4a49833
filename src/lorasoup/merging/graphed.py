"""The ΔW-space merges on a GPU as one captured CUDA graph per kind of module.

A 7B adapter pair is 160 modules of three shapes, and the eager merge of one module launches a few
hundred small kernels (the row blocks' GEMMs, the magnitude cut, the fused combine, the range
finder's GEMMs and CholeskyQR passes). Launched one by one from Python, they keep the host busier
than the GPU: on an H200 the eager ``ties`` took 1.22 s for 0.43 s of kernels. None of that work
reads the device until the range finder's small Gram matrix is formed, so :class:`GraphedDeltaMerge`
captures it once per module signature (shape, ranks, method and its parameters) and replays it:

1. the module's factors are copied into the graph's input buffers (``B`` already times the scalar
   that the eager path folds into each block's GEMM), the range finder's probe is drawn from the
   module's generator as the eager path draws it;
2. the graph runs: magnitude cuts, the merged ``ΔW``, its norm, the orthonormal basis ``Q``,
   ``Y = QᵀΔW`` and the ``w × w`` Gram matrix ``Y Yᵀ``;
3. one packet comes back (the Gram matrix, ``‖ΔW‖`` and whether every cut and the basis were sound),
   and the host finishes the SVD (:func:`lorasoup.lowrank.range_svd_from_gram`, as the eager path
   does).

The same functions run in the same order as :func:`lorasoup.merging.delta.merge_delta`,
so the factors are the eager ones. A module whose packet reports a missed magnitude bracket or an
unhealthy CholeskyQR basis is redone eagerly, which handles both exactly. A signature's first module
runs eagerly (on the capture stream: it compiles the Triton kernels and sets up cuBLAS there); the
second captures. A capture that fails (a kernel that cannot be captured on this stack) is warned
about once and its signature stays eager. All graphs share one memory pool, which holds about the
peak of one eager module; each replay's outputs are copied out of it before another graph runs.
"""

from __future__ import annotations

import contextlib
import dataclasses
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from lorasoup.adapters import LoraFactors
from lorasoup.lowrank import (
    OVERSAMPLE,
    POWER_ITERATIONS,
    range_basis,
    range_probe,
    range_svd_from_gram,
    truncate_randomized,
    wide_gram,
)
from lorasoup.merging import rowwise
from lorasoup.merging.base import MergeParams, ModuleMerge, present
from lorasoup.merging.delta import Recipe, merge_delta, output_rank


@dataclass
class _Graph:
    """A captured module merge: its input buffers, its outputs, and the graph that links them."""

    A: list[Tensor]  # (r_i, in) float32
    B: list[Tensor]  # (out, r_i) float32, times the folded scalar
    weights: Tensor  # (K,) float32: the plan's weights after trimming
    keys: Tensor  # (K,) int64: DARE's task keys
    probe: Tensor  # (in, w) float32
    Q: Tensor | None = None  # (out, w)
    Y: Tensor | None = None  # (w, in)
    packet: Tensor | None = None  # (w·w + 2,) float64: Gram matrix, ‖ΔW‖, sound (1) or not (0)
    graph: torch.cuda.CUDAGraph | None = None
    # copies outside the graph's memory pool, made after each replay: another graph's replay may
    # reuse the pool while the host still finishes this module
    kept_Q: Tensor | None = None
    kept_Y: Tensor | None = None
    host_packet: Tensor | None = None  # pinned


@dataclass
class _Pending:
    """A replayed module whose packet is on its way to the host."""

    name: str
    graph: _Graph
    kept: Sequence[LoraFactors]
    params: MergeParams
    arguments: tuple  # merge_delta's, for an eager redo
    drawn: Tensor  # the generator's state before the module's probe
    landed: torch.cuda.Event


@dataclass
class _Landing:
    """A finished module whose factors are being copied into the pinned staging buffer."""

    name: str
    shapes: tuple[tuple[int, int], tuple[int, int]]  # A's, B's
    discarded_energy: float


Finished = list[tuple[str, ModuleMerge]]


class GraphedDeltaMerge:
    """A :class:`lorasoup.merging.base.StreamingMerge` of one ΔW-space preset on ``device``: the
    modules of one run go through :meth:`submit` and :meth:`finish`; each result equals
    :func:`merge_delta`'s (see the module docstring), with ``A`` and ``B`` on the host.

    Modules are pipelined one deep: :meth:`submit` replays a module's graph, then finishes the
    previous module on the host while the GPU runs it, and returns whatever has completed (the
    module before that, whose factors have reached the host). ``capture=False`` runs the same split
    (device part, one read, host finish) one module at a time without capturing: the decomposition
    can then be checked on any device.
    """

    def __init__(self, recipe: Recipe, device: torch.device, *, capture: bool | None = None) -> None:
        self.recipe, self.device = recipe, torch.device(device)
        self.capture = self.device.type == "cuda" if capture is None else capture
        self.graphs: dict[tuple, _Graph] = {}
        self.warmed: set[tuple] = set()  # signatures whose first module ran eagerly
        self.uncapturable: set[tuple] = set()
        self.pending: _Pending | None = None
        self.landing: _Landing | None = None
        self.staging: Tensor | None = None  # pinned float32, reused for every module's factors
        if self.capture:
            self.pool = torch.cuda.graph_pool_handle()
            self.stream = torch.cuda.Stream(self.device)
        self.stats = {"replayed": 0, "eager": 0, "redone": 0}

    def submit(
        self,
        name: str,
        factors: Sequence[LoraFactors | None],
        weights: Tensor,
        params: MergeParams,
        generator: torch.Generator,
    ) -> Finished:
        """Start merging module ``name``; returns the modules finished meanwhile, in order."""
        with self._on_device():
            return self._submit(name, (factors, weights, params, generator))

    def finish(self) -> Finished:
        """Complete every submitted module; returns those not returned yet, in order."""
        with self._on_device():
            done = self._complete_pending()
            if self.landing is not None:
                torch.cuda.current_stream(self.device).synchronize()
                done.append(self._take_landing())
            return done

    def _on_device(self) -> contextlib.AbstractContextManager:
        """The merge's GPU as the current device: replays, events and the default stream are
        per device, and the caller's current device may be another one."""
        return torch.cuda.device(self.device) if self.capture else contextlib.nullcontext()

    def _submit(self, name: str, arguments: tuple) -> Finished:
        factors, weights, params, generator = arguments
        kept, w = present(factors, weights)
        plan = rowwise.plan_rows(
            kept,
            w.tolist(),
            sparsify=self.recipe.sparsify,
            consensus=self.recipe.consensus,
            density=params.density,
            sign_method=params.majority_sign,
            generator=generator,
        )
        total = kept[0].out_features * kept[0].in_features
        small = plan.keep is not None and total <= 4 * rowwise.SAMPLE_SIZE
        if params.svd != "randomized" or small or (self.capture and not plan.kernel):
            # exact SVDs read the device; so do the exact cut of small modules and the torch trim
            # (without Triton): none of them can be captured
            return [*self.finish(), (name, self._eager(*arguments))]
        if not self.capture:
            graph = self._buffers(kept, output_rank(kept, params))
            drawn = generator.get_state()
            self._fill(graph, kept, plan, generator)
            graph.Q, graph.Y, graph.packet = self._device_part(graph, plan)
            finished = self._finish_module(graph.Q, graph.Y, graph.packet, kept, params)
            if finished is None:
                return [(name, self._redo(arguments, drawn))]
            A, B, discarded = finished
            return [(name, ModuleMerge(A=A, B=B, discarded_energy=discarded))]
        signature = (
            kept[0].out_features,
            kept[0].in_features,
            tuple(f.rank for f in kept),
            params.density,
            params.majority_sign,
            output_rank(kept, params),
            rowwise.SAMPLE_SIZE,
            plan.blocks[0],
            plan.kernel,
        )
        done: Finished = []
        graph = self.graphs.get(signature)
        if graph is None:
            done = self.finish()  # a warm-up or a capture needs the device to itself
            if signature in self.uncapturable:
                return [*done, (name, self._eager(*arguments))]
            if signature not in self.warmed:
                self.warmed.add(signature)
                return [*done, (name, self._on_capture_stream(lambda: self._eager(*arguments)))]
            graph = self._capture(kept, plan, params, signature)
            if graph is None:
                self.uncapturable.add(signature)
                return [*done, (name, self._eager(*arguments))]
            self.graphs[signature] = graph
        drawn = generator.get_state()  # a host-side copy of the seed and offset
        self._fill(graph, kept, plan, generator)
        graph.graph.replay()
        self.stats["replayed"] += 1
        done += self._complete_pending()  # on the host while the GPU runs this module's graph
        graph.kept_Q.copy_(graph.Q)
        graph.kept_Y.copy_(graph.Y)
        graph.host_packet.copy_(graph.packet, non_blocking=True)
        landed = torch.cuda.Event()
        landed.record()
        self.pending = _Pending(name, graph, kept, params, arguments, drawn, landed)
        return done

    def _complete_pending(self) -> Finished:
        """Wait for the pending module's packet; hand over the module before it (its factors landed
        with that packet); finish the pending one, its copy to the host queued behind the GPU's work."""
        if self.pending is None:
            return []
        pending, self.pending = self.pending, None
        pending.landed.synchronize()
        done = [self._take_landing()] if self.landing is not None else []
        graph = pending.graph
        finished = self._finish_module(
            graph.kept_Q, graph.kept_Y, graph.host_packet, pending.kept, pending.params
        )
        if finished is None:
            done.append((pending.name, self._redo(pending.arguments, pending.drawn)))
            return done
        A, B, discarded = finished
        needed = A.numel() + B.numel()
        if self.staging is None or self.staging.numel() < needed:
            self.staging = torch.empty(needed, dtype=torch.float32, pin_memory=True)
        self.staging[: A.numel()].view(A.shape).copy_(A, non_blocking=True)
        self.staging[A.numel() : needed].view(B.shape).copy_(B, non_blocking=True)
        self.landing = _Landing(pending.name, (tuple(A.shape), tuple(B.shape)), discarded)
        return done

    def _take_landing(self) -> tuple[str, ModuleMerge]:
        landing, self.landing = self.landing, None
        (a_rows, a_cols), (b_rows, b_cols) = landing.shapes
        a_size = a_rows * a_cols
        A = self.staging[:a_size].view(a_rows, a_cols).clone()
        B = self.staging[a_size : a_size + b_rows * b_cols].view(b_rows, b_cols).clone()
        return landing.name, ModuleMerge(A=A, B=B, discarded_energy=landing.discarded_energy)

    def _eager(self, *arguments) -> ModuleMerge:
        self.stats["eager"] += 1
        result = merge_delta(self.recipe, *arguments)
        return ModuleMerge(A=result.A.cpu(), B=result.B.cpu(), discarded_energy=result.discarded_energy)

    def _redo(self, arguments: tuple, drawn: Tensor) -> ModuleMerge:
        """An unsound module (a missed bracket, an unhealthy basis) merged eagerly, which handles both
        exactly; its generator is put back to draw the same probe."""
        self.stats["redone"] += 1
        arguments[-1].set_state(drawn)
        return self._eager(*arguments)

    def _buffers(self, kept: Sequence[LoraFactors], rank: int) -> _Graph:
        out_features, in_features = kept[0].out_features, kept[0].in_features
        width = min(rank + OVERSAMPLE, out_features, in_features)
        empty = lambda *shape, dtype=torch.float32: torch.empty(shape, dtype=dtype, device=self.device)  # noqa: E731
        return _Graph(
            A=[empty(f.rank, in_features) for f in kept],
            B=[empty(out_features, f.rank) for f in kept],
            weights=empty(len(kept)),
            keys=empty(len(kept), dtype=torch.int64),
            probe=empty(in_features, width),
        )

    def _fill(
        self, graph: _Graph, kept: Sequence[LoraFactors], plan: rowwise.RowPlan, generator: torch.Generator
    ) -> None:
        """This module's inputs into the graph's buffers (copies queued, nothing read back)."""
        for i, task in enumerate(kept):
            graph.A[i].copy_(task.A)
            # fp32 first, then the scalar: the eager path's B[rows].to(float32) * (scale * times)
            graph.B[i].copy_(task.B).mul_(task.scale * plan.folded[i])
        graph.weights.copy_(torch.tensor(plan.after, dtype=torch.float32), non_blocking=True)
        keys = plan.dare[0] if plan.dare is not None else (0,) * len(kept)
        graph.keys.copy_(torch.tensor(keys, dtype=torch.int64), non_blocking=True)
        graph.probe.copy_(range_probe(*graph.probe.shape, generator, torch.float32))

    def _device_part(self, graph: _Graph, plan: rowwise.RowPlan) -> tuple[Tensor, Tensor, Tensor]:
        """Step 2 of the module docstring, from the buffers: ``Q``, ``Y`` and the packet."""
        tasks = [LoraFactors(A=A, B=B, scale=1.0) for A, B in zip(graph.A, graph.B, strict=True)]
        plan = dataclasses.replace(plan, folded=(1.0,) * len(tasks))  # the buffers hold B times it
        sound = torch.ones((), dtype=torch.bool, device=self.device)
        cuts = None
        if plan.keep is not None:
            cuts = [rowwise.unchecked_cut(t, plan.keep, plan.blocks, use_kernel=plan.kernel) for t in tasks]
            for cut in cuts:
                sound = sound & cut.ok
        merged = rowwise.combine_rows(tasks, plan, cuts, device_weights=graph.weights, device_keys=graph.keys)
        norm = torch.linalg.vector_norm(merged)
        # as dense_lowrank: CholeskyQR2 and TF32 subspace products on a GPU, Householder elsewhere
        cuda = merged.is_cuda
        Q, healthy = range_basis(merged, graph.probe, POWER_ITERATIONS, cholesky=cuda, tf32=cuda)
        Y = Q.T @ merged
        flags = [norm.double().reshape(1), (sound & healthy).double().reshape(1)]
        packet = torch.cat([wide_gram(Y).reshape(-1), *flags])
        return Q, Y, packet

    def _finish_module(
        self, Q: Tensor, Y: Tensor, packet: Tensor, kept: Sequence[LoraFactors], params: MergeParams
    ) -> tuple[Tensor, Tensor, float] | None:
        """Step 3 from the packet on the host: ``(A, B, discarded energy)`` on the device (queued, not
        waited for), or ``None`` for an unsound module."""
        if float(packet[-1]) != 1.0:
            return None
        width = Y.shape[0]
        U, S, Vh = range_svd_from_gram(Q, Y, packet[: width * width].view(width, width))
        low = truncate_randomized(
            U,
            S,
            Vh,
            float(packet[-2]),
            rank=output_rank(kept, params),
            energy=params.energy,
            dtype=torch.float32,
        )
        return low.A, low.B, low.discarded_energy

    def _on_capture_stream(self, work):
        """Run ``work`` on the capture stream, ordered after everything queued before it and before
        everything queued after it (as PyTorch's notes on warming up before a capture do)."""
        current = torch.cuda.current_stream(self.device)
        self.stream.wait_stream(current)
        with torch.cuda.stream(self.stream):
            result = work()
        current.wait_stream(self.stream)
        return result

    def _capture(
        self, kept: Sequence[LoraFactors], plan: rowwise.RowPlan, params: MergeParams, signature: tuple
    ) -> _Graph | None:
        graph = self._buffers(kept, output_rank(kept, params))
        graph.graph = torch.cuda.CUDAGraph()
        self.stream.wait_stream(torch.cuda.current_stream(self.device))
        try:
            with torch.cuda.graph(graph.graph, pool=self.pool, stream=self.stream):
                graph.Q, graph.Y, graph.packet = self._device_part(graph, plan)
        except Exception as err:
            warnings.warn(
                f"merging modules of shape {signature[:2]} eagerly: CUDA graph capture failed ({err})",
                RuntimeWarning,
                stacklevel=3,
            )
            return None
        graph.kept_Q, graph.kept_Y = torch.empty_like(graph.Q), torch.empty_like(graph.Y)
        graph.host_packet = torch.empty(graph.packet.shape, dtype=graph.packet.dtype, pin_memory=True)
        return graph
