"""Core-space merging: merge LoRA adapters as small ``ΣR × ΣR`` cores in shared bases.

Panariello et al., "Accurate and Efficient Low-Rank Model Merging in Core Space", NeurIPS 2025,
https://arxiv.org/abs/2509.17786. Per module, for adapters ``i = 1..K`` (``A_i (r_i, in)``,
``B_i (out, r_i)``, scale ``s_i``, ``R = Σ r_i``):

1. **shared bases**: ``U (out, m)``, the left singular vectors of the stacked ``[B_1 … B_K] (out, R)``,
   and ``V (in, n)``, the right singular vectors of the stacked ``[A_1; …; A_K] (R, in)``
   (``m = min(out, R)``, ``n = min(in, R)``; the stored factors, scales apart; thin QR + small SVD);
2. **cores**: ``M_i = s_i (Uᵀ B_i)(A_i V) (m, n)``. Every column of ``B_i`` lies in ``span U`` and every
   row of ``A_i`` in ``span V``, so ``ΔW_i = U M_i Vᵀ`` exactly: the cores lose nothing;
3. **merge** the cores with any method into ``M (m, n)``;
4. **map back**: ``ΔW = U M Vᵀ``, a LoRA at scale 1 with ``B = U M``, ``A = Vᵀ`` (rank ``n``; or
   ``B = U``, ``A = M Vᵀ`` when ``m < n``). ``rank`` / ``energy`` truncate it exactly
   (``lorasoup.lowrank.recompress``; the singular values of ``ΔW`` are those of ``M``).

Every step multiplies or decomposes thin ``(out|in) × R`` matrices or ``R × R`` cores: the merge never
builds an ``out × in`` tensor, costs ``O((out + in)·R²)``, allows mixed ranks, and needs no
re-truncation (mergekit's pending port densifies and re-truncates; the reference is research scripts).

**What each method is, precisely** (the registered names):

* ``core_linear``: ``M = Σ w_i M_i``, hence ``ΔW = Σ w_i ΔW_i``: task arithmetic, exactly (the same
  update as ``linear``, in rank ``min(out, in, R)`` instead of ``R``).
* ``core_ties``, ``core_dare``, ``core_dare_ties``: the TIES / DARE presets of
  ``lorasoup.merging.task_arithmetic`` (same trim, random drop, sign election, disjoint mean, same
  parameters) applied **to the entries of the cores** ``M_i = Uᵀ ΔW_i V``, that is, to each task's
  update written in the shared orthonormal basis ``{u_a v_bᵀ}``, not to the entries of ``ΔW_i`` in
  the standard basis. These are not the ΔW-space ``ties`` / ``dare_*`` (which trim ``out × in``
  entries); they are those definitions in another basis, the paper's method. The result does not
  depend on the signs the SVDs give the basis vectors (a flipped ``u_a`` flips row ``a`` of every
  core, and trim, drop, election and mean all commute with that), so it is well defined wherever the
  stacked factors' singular values are distinct. DARE's draws are ``torch.bernoulli`` with the
  module's generator over the ``K`` cores in order, as ``drop_random``.
* ``core_tsv``: TSV-Merge (``merging.tsv``) on the cores: each core's SVD, truncation, the polar
  factors of the concatenated core singular vectors, mapped back. Because ``U`` and ``V`` are
  orthonormal the polar factor commutes with them, so ``core_tsv`` equals ``tsv`` on ``ΔW``.

Adapters of weight 0 are left out before the bases are built (otherwise they would still shape the
bases, hence the trimmed entries). An adapter absent from a module contributes nothing, as elsewhere.

**Batched.** Every step is written for a batch of ``G`` modules of one shape and ranks
(:func:`merge_cores`; one module is a batch of one). The arithmetic is small, so a run merged module
by module is bound by per-module latency, not FLOPs: two thin QRs, two small SVDs with a round trip
to the host, and a few dozen kernels for each of a 7B model's 160 modules. On CUDA the runner streams
the modules through ``merging.core_batched.BatchedCoreMerge``, which groups them by signature and
merges each group with these same functions, one batched factorisation per side and group.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from itertools import accumulate

import torch
from torch import Tensor

from lorasoup.adapters import LoraFactors
from lorasoup.merging.base import (
    MergeMethod,
    MergeParams,
    ModuleMerge,
    StreamingMerge,
    register,
)
from lorasoup.merging.core_batched import BatchedCoreMerge
from lorasoup.merging.delta import RECIPES, merge_task_batch
from lorasoup.merging.subspace import column_bases, thin_svd
from lorasoup.merging.task_arithmetic import DARE, TIES
from lorasoup.merging.tsv import (
    TSV,
    finish,
    kept_triplets,
    taking_part,
    truncate,
    whiten_and_combine,
)

CORE_SPACE = "Core Space merging, Panariello et al. NeurIPS 2025, https://arxiv.org/abs/2509.17786"


@dataclass(frozen=True)
class CoreSpace:
    """A batch of ``G`` modules of one shape and ranks written in shared bases:
    ``ΔW_gi = U[g] cores[g, i] V[g]ᵀ`` (float64; ``G = 1`` for the per-module merge).

    Shapes: ``U (G, out, m)``, ``V (G, in, n)`` with orthonormal columns, ``cores (G, K, m, n)``;
    ``ranks``: each adapter's LoRA rank ``r_i`` (its cores' rank is at most that).
    """

    U: Tensor
    V: Tensor
    cores: Tensor
    ranks: tuple[int, ...]

    def to_update(self, cores: Tensor) -> tuple[Tensor, Tensor]:
        """``cores (G, m, n)`` → LoRA factors ``A (G, k, in)``, ``B (G, out, k)`` with
        ``B A = U core Vᵀ``, ``k = min(m, n)`` (the small side carries the core)."""
        if self.U.shape[-1] < self.V.shape[-1]:
            return cores @ self.V.mT, self.U  # (G, m, in), (G, out, m)
        return self.V.mT, self.U @ cores  # (G, n, in), (G, out, n)


def core_space(modules: Sequence[Sequence[LoraFactors]]) -> CoreSpace:
    """Steps 1–2 of the module docstring for ``G`` modules at once: ``modules[g][i]`` is adapter ``i``
    at module ``g``; every module has the same ``out``, ``in`` and ranks (a batch of one: a module).
    The bases are one batched thin QR per side and one host call for both sides' small SVDs
    (``subspace.column_bases``)."""
    by_adapter = list(zip(*modules, strict=True))  # [i][g]: one stack per adapter, not per module
    B = torch.cat([torch.stack([f.B for f in fs]) for fs in by_adapter], dim=2).double()  # (G, out, R)
    A = torch.cat([torch.stack([f.A for f in fs]) for fs in by_adapter], dim=1).double()  # (G, R, in)
    scales = torch.tensor([[f.scale for f in m] for m in modules], dtype=torch.float64, device=B.device)
    U, V = column_bases(B, A.mT)  # (G, out, m), (G, in, n)
    left, right = U.mT @ B, A @ V  # (G, m, R), (G, R, n)
    ranks = tuple(f.rank for f in modules[0])
    ends = list(accumulate(ranks))
    cores = torch.stack(
        [left[..., end - r : end] @ right[:, end - r : end] for r, end in zip(ranks, ends, strict=True)],
        dim=1,
    )  # (G, K, m, n): (m, r_i)(r_i, n) per module and adapter
    return CoreSpace(U=U, V=V, cores=cores * scales[..., None, None], ranks=ranks)


CoreMerge = Callable[[CoreSpace, Tensor, MergeParams, Sequence[torch.Generator]], Tensor]
"""``(space of G modules, weights (G, K) float64, params, one generator per module) → merged cores
(G, m, n)``: each module's result depends on its own cores, weights and generator only."""


def linear_cores(
    space: CoreSpace, weights: Tensor, params: MergeParams, generators: Sequence[torch.Generator]
) -> Tensor:
    """``Σ_i w_i M_i``."""
    return torch.einsum("gk,gkmn->gmn", weights.to(space.cores), space.cores)


def preset_cores(name: str) -> CoreMerge:
    """A sparsify × consensus preset of ``task_arithmetic`` acting on the cores' entries, module by
    module (``delta.merge_task_batch``: each module trimmed on its own, drawn from its generator)."""
    recipe = RECIPES[name]

    def merge(
        space: CoreSpace, weights: Tensor, params: MergeParams, generators: Sequence[torch.Generator]
    ) -> Tensor:
        return merge_task_batch(
            space.cores,
            weights.to(space.cores),
            recipe,
            density=params.density,
            sign_method=params.majority_sign,
            generators=generators,
        )

    return merge


def tsv_cores(
    space: CoreSpace, weights: Tensor, params: MergeParams, generators: Sequence[torch.Generator]
) -> Tensor:
    """TSV-Merge on the cores: each ``M_i``'s top ``⌊density · r_i⌋`` triplets, whitened, combined.

    The weights scale each task's singular values here (``whiten_and_combine`` then weighs by 1):
    they differ from module to module when an adapter is absent from some."""
    u, S, vh = thin_svd(space.cores)  # (G, K, m, p), (G, K, p), (G, K, p, n): every core at once
    weights = weights.to(S)
    tasks = [
        truncate((u[:, i], S[:, i] * weights[:, i, None], vh[:, i].mT), kept_triplets(rank, params.density))
        for i, rank in enumerate(space.ranks)
    ]
    B, A = whiten_and_combine(tasks, [1.0] * len(tasks))  # (G, m, Σk), (G, Σk, n)
    return B @ A  # (G, m, n)


def merge_in_core_space(
    combine: CoreMerge,
    factors: Sequence[LoraFactors | None],
    weights: Tensor,
    params: MergeParams,
    generator: torch.Generator,
) -> ModuleMerge:
    """One module through core space (module docstring): bases, cores, ``combine``, map back: a batch
    of one for :func:`merge_cores`, which ``BatchedCoreMerge`` (``merging.core_batched``) runs on many."""
    active, numbers, dtype, zero = taking_part(factors, weights)
    if zero is not None:
        return zero
    A, B = merge_cores(combine, [active], torch.tensor([numbers], dtype=torch.float64), params, [generator])
    return finish(A[0], B[0], params, dtype)


def merge_cores(
    combine: CoreMerge,
    modules: Sequence[Sequence[LoraFactors]],
    weights: Tensor,
    params: MergeParams,
    generators: Sequence[torch.Generator],
) -> tuple[Tensor, Tensor]:
    """Steps 1–4 for ``G`` modules of one shape and ranks (``modules[g][i]``: adapter ``i`` at module
    ``g``, every one weighted, ``weights (G, K)``): ``A (G, k, in)``, ``B (G, out, k)`` float64."""
    space = core_space(modules)
    merged = combine(space, weights.to(space.cores.device, torch.float64), params, generators)  # (G, m, n)
    return space.to_update(merged)


def _method(combine: CoreMerge) -> Callable[..., ModuleMerge]:
    def merge(
        factors: Sequence[LoraFactors | None],
        weights: Tensor,
        params: MergeParams,
        generator: torch.Generator,
    ) -> ModuleMerge:
        return merge_in_core_space(combine, factors, weights, params, generator)

    return merge


def _batched(combine: CoreMerge) -> Callable[[torch.device], StreamingMerge]:
    def start(device: torch.device) -> StreamingMerge:
        del device  # each group is merged where the runner put its factors
        return BatchedCoreMerge(partial(merge_cores, combine))

    return start


_SUFFIX = " in core space (shared SVD bases of the stacked A's and B's; never dense)"
_METHODS: dict[str, tuple[CoreMerge, str, str]] = {
    "core_linear": (linear_cores, "Σ w_i M_i: task arithmetic, exact", CORE_SPACE),
    "core_ties": (
        preset_cores("ties"),
        "TIES on the cores' entries: trim to top `density`, elect signs, disjoint mean",
        f"{CORE_SPACE}; {TIES}",
    ),
    "core_dare": (
        preset_cores("dare_linear"),
        "DARE on the cores' entries: drop at random (keep `density`), rescale, weighted sum",
        f"{CORE_SPACE}; {DARE}",
    ),
    "core_dare_ties": (
        preset_cores("dare_ties"),
        "DARE's drop and rescale on the cores' entries, then TIES' election and disjoint mean",
        f"{CORE_SPACE}; {DARE}",
    ),
    "core_tsv": (
        tsv_cores,
        "TSV-Merge on the cores (equals `tsv` on ΔW): top `density` triplets per task, whitened",
        f"{CORE_SPACE}; {TSV}",
    ),
}

for _name, (_combine, _summary, _reference) in _METHODS.items():
    register(
        MergeMethod(
            name=_name,
            merge=_method(_combine),
            space="core",
            summary=_summary + _SUFFIX,
            reference=_reference,
            uses_density=_name != "core_linear",
            uses_sign=_name in ("core_ties", "core_dare_ties"),
            random=_name in ("core_dare", "core_dare_ties"),
            streaming=_batched(_combine),
        )
    )
