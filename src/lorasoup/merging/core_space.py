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
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from lorasoup.adapters import LoraFactors
from lorasoup.merging.base import MergeMethod, MergeParams, ModuleMerge, present, register
from lorasoup.merging.delta import RECIPES, merge_tasks
from lorasoup.merging.subspace import column_basis, thin_svd
from lorasoup.merging.task_arithmetic import DARE, TIES
from lorasoup.merging.tsv import (
    TSV,
    finish,
    kept_triplets,
    nonzero,
    result_dtype,
    truncate,
    whiten_and_combine,
    zero_merge,
)

CORE_SPACE = "Core Space merging, Panariello et al. NeurIPS 2025, https://arxiv.org/abs/2509.17786"


@dataclass(frozen=True)
class CoreSpace:
    """Adapters written in shared bases: ``ΔW_i = U cores[i] Vᵀ`` (float64).

    Shapes: ``U (out, m)``, ``V (in, n)`` with orthonormal columns, ``cores (K, m, n)``; ``ranks``: each
    adapter's LoRA rank ``r_i`` (its core's rank is at most that).
    """

    U: Tensor
    V: Tensor
    cores: Tensor
    ranks: tuple[int, ...]

    def to_update(self, core: Tensor) -> tuple[Tensor, Tensor]:
        """``core (m, n)`` → LoRA factors ``A (k, in)``, ``B (out, k)`` with ``B A = U core Vᵀ``,
        ``k = min(m, n)`` (the small side carries the core)."""
        if self.U.shape[1] < self.V.shape[1]:
            return core @ self.V.T, self.U  # (m, in), (out, m)
        return self.V.T, self.U @ core  # (n, in), (out, n)


def core_space(factors: Sequence[LoraFactors]) -> CoreSpace:
    """Step 1–2 of the module docstring for the adapters of one module."""
    U = column_basis(torch.cat([f.B for f in factors], dim=1))  # (out, m)
    V = column_basis(torch.cat([f.A for f in factors], dim=0).T)  # (in, n)
    cores = torch.stack(
        [f.scale * ((U.T @ f.B.double()) @ (f.A.double() @ V)) for f in factors]  # (m, r_i)(r_i, n)
    )  # (K, m, n)
    return CoreSpace(U=U, V=V, cores=cores, ranks=tuple(f.rank for f in factors))


CoreMerge = Callable[[CoreSpace, Tensor, MergeParams, torch.Generator], Tensor]
"""``(space, weights (K,) float64, params, generator) → merged core (m, n)``."""


def linear_cores(
    space: CoreSpace, weights: Tensor, params: MergeParams, generator: torch.Generator
) -> Tensor:
    """``Σ_i w_i M_i``."""
    return torch.tensordot(weights.to(space.cores), space.cores, dims=1)


def preset_cores(name: str) -> CoreMerge:
    """A sparsify × consensus preset of ``task_arithmetic`` acting on the cores' entries."""
    recipe = RECIPES[name]

    def merge(space: CoreSpace, weights: Tensor, params: MergeParams, generator: torch.Generator) -> Tensor:
        return merge_tasks(
            space.cores,
            weights.to(space.cores),
            recipe,
            density=params.density,
            sign_method=params.majority_sign,
            generator=generator,
        )

    return merge


def tsv_cores(space: CoreSpace, weights: Tensor, params: MergeParams, generator: torch.Generator) -> Tensor:
    """TSV-Merge on the cores: each ``M_i``'s top ``⌊density · r_i⌋`` triplets, whitened, combined."""
    tasks = []
    for core, rank in zip(space.cores, space.ranks, strict=True):
        u, S, vh = thin_svd(core)  # (m, p), (p,), (p, n)
        tasks.append(truncate((u, S, vh.T), kept_triplets(rank, params.density)))
    B, A = whiten_and_combine(tasks, weights.tolist())
    return B @ A  # (m, n)


def merge_in_core_space(
    combine: CoreMerge,
    factors: Sequence[LoraFactors | None],
    weights: Tensor,
    params: MergeParams,
    generator: torch.Generator,
) -> ModuleMerge:
    """One module through core space (module docstring): bases, cores, ``combine``, map back."""
    kept, w = present(factors, weights)
    dtype = result_dtype(kept)
    active, numbers = nonzero(kept, w)
    if not active:
        return zero_merge(kept, dtype)
    space = core_space(active)
    weight_tensor = torch.tensor(numbers, dtype=torch.float64, device=space.cores.device)
    A, B = space.to_update(combine(space, weight_tensor, params, generator))
    return finish(A, B, params, dtype)


def _method(combine: CoreMerge) -> Callable[..., ModuleMerge]:
    def merge(
        factors: Sequence[LoraFactors | None],
        weights: Tensor,
        params: MergeParams,
        generator: torch.Generator,
    ) -> ModuleMerge:
        return merge_in_core_space(combine, factors, weights, params, generator)

    return merge


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
        )
    )
