"""TSV-Merge: task singular vectors, compressed per task and whitened across tasks.

Gargiulo et al., "Task Singular Vectors: Reducing Task Interference in Model Merging", CVPR 2025,
https://arxiv.org/abs/2412.00081. Per module, for tasks ``i = 1..K`` with updates ``ΔW_i = s_i B_i A_i``:

1. **compress**: the SVD ``ΔW_i = U_i Σ_i V_iᵀ``, keeping the top ``k_i = max(1, ⌊density · r_i⌋)``
   triplets (the paper keeps a ``1/K`` share of each layer's rank; ``density`` says which share);
2. **concatenate**: ``U = [U_1 … U_K] (out, Σk)``, ``V = [V_1 … V_K] (in, Σk)``,
   ``Σ = diag(w_1 Σ_1, …, w_K Σ_K)`` (the merge weights scale each task's singular values; the
   paper's single ``α`` is ``w_i = α``);
3. **whiten** (decorrelate the tasks' subspaces): ``U⊥ = P_U Q_Uᵀ`` from the thin SVD
   ``U = P_U S_U Q_Uᵀ``, the same for ``V`` (the orthogonal Procrustes / polar factor);
4. ``ΔW = U⊥ Σ V⊥ᵀ``, a LoRA of rank ``Σ k_i`` at scale 1: ``B = U⊥ Σ``, ``A = V⊥ᵀ``.

``ΔW_i`` has rank ``≤ r_i``, so step 1 is exact from the factors (QR of ``B_i`` and ``A_iᵀ``, SVD of the
``r_i × r_i`` core) and every later step multiplies thin matrices: the merge never builds an ``out × in``
tensor. ``rank`` / ``energy`` recompress the result exactly (``lorasoup.lowrank.recompress``).
Adapters of weight 0 are left out (they would otherwise still bend the others' whitened bases).
The same merge in core space is ``core_tsv`` (``merging.core_space``); it gives the same update,
because the polar factor is equivariant under the orthonormal core bases.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from lorasoup.adapters import LoraFactors
from lorasoup.lowrank import recompress
from lorasoup.merging.base import MergeMethod, MergeParams, ModuleMerge, present, register
from lorasoup.merging.ops import check_density
from lorasoup.merging.subspace import polar_factor, product_svd

TSV = "TSV-Merge, Gargiulo et al. CVPR 2025, https://arxiv.org/abs/2412.00081"

TaskSvd = tuple[Tensor, Tensor, Tensor]
"""One task's kept triplets: ``U (out, k)``, ``S (k,)``, ``V (in, k)`` with ``ΔW_i ≈ U diag(S) Vᵀ``."""


def kept_triplets(rank: int, density: float) -> int:
    """``k = max(1, ⌊density · rank⌋)``: how many singular triplets of a rank-``rank`` task TSV keeps."""
    check_density(density)
    return max(1, int(density * rank))


def truncate(svd: TaskSvd, keep: int) -> TaskSvd:
    """The ``keep`` leading triplets of ``svd`` (singular values in descending order; leading
    dimensions, if any, are a batch)."""
    U, S, V = svd
    return U[..., :keep], S[..., :keep], V[..., :keep]


def task_singular_vectors(factors: LoraFactors, keep: int) -> TaskSvd:
    """The top ``keep`` singular triplets of ``ΔW = s B A``, exactly, from the factors (float64)."""
    return truncate(product_svd(factors.B, factors.scale * factors.A.double()), keep)


def whiten_and_combine(tasks: Sequence[TaskSvd], weights: Sequence[float]) -> tuple[Tensor, Tensor]:
    """Steps 2–4 (module docstring): ``B (n, Σk)``, ``A (Σk, m)`` with ``B A = U⊥ diag(w S) V⊥ᵀ``.

    ``tasks[i] = (U_i (*, n, k_i), S_i (*, k_i), V_i (*, m, k_i))`` in any coordinates (``n × m`` is
    the module's ``out × in``, or a core's size); leading dimensions, if any, are a batch of modules.
    """
    U = torch.cat([u for u, _, _ in tasks], dim=-1)  # (*, n, Σk)
    V = torch.cat([v for _, _, v in tasks], dim=-1)  # (*, m, Σk)
    S = torch.cat([float(w) * s for (_, s, _), w in zip(tasks, weights, strict=True)], dim=-1)  # (*, Σk)
    return polar_factor(U) * S[..., None, :], polar_factor(V).mT


def taking_part(
    factors: Sequence[LoraFactors | None], weights: Tensor
) -> tuple[list[LoraFactors], list[float], torch.dtype, ModuleMerge | None]:
    """The adapters a merge of one module takes: present and weighted not 0, their weights as
    numbers, the result's dtype, and the module's zero update when none takes part (else ``None``).

    Adapters of weight 0 are left out before anything is built from the factors: in TSV and core
    space they would still shape the bases."""
    kept, w = present(factors, weights)
    dtype = result_dtype(kept)
    pairs = [(f, float(x)) for f, x in zip(kept, w, strict=True) if float(x) != 0.0]
    zero = None if pairs else zero_merge(kept, dtype)
    return [f for f, _ in pairs], [x for _, x in pairs], dtype, zero


def result_dtype(factors: Sequence[LoraFactors]) -> torch.dtype:
    """float64 for float64 factors, float32 otherwise (bfloat16 and float16 included)."""
    return torch.promote_types(factors[0].A.dtype, torch.float32)


def zero_merge(factors: Sequence[LoraFactors], dtype: torch.dtype) -> ModuleMerge:
    """A rank-1 zero update: what every merge of adapters all weighted 0 is."""
    some = factors[0]
    return ModuleMerge(
        A=some.A.new_zeros(1, some.in_features, dtype=dtype),
        B=some.B.new_zeros(some.out_features, 1, dtype=dtype),
    )


def finish(A: Tensor, B: Tensor, params: MergeParams, dtype: torch.dtype) -> ModuleMerge:
    """The merged factors as they are, or recompressed exactly when ``rank`` / ``energy`` is given."""
    if params.rank is None and params.energy is None:
        return ModuleMerge(A=A.to(dtype), B=B.to(dtype))
    low = recompress(A, B, rank=params.rank, energy=params.energy)
    return ModuleMerge(A=low.A.to(dtype), B=low.B.to(dtype), discarded_energy=low.discarded_energy)


def merge_tsv(
    factors: Sequence[LoraFactors | None], weights: Tensor, params: MergeParams, generator: torch.Generator
) -> ModuleMerge:
    """TSV-Merge of one module (module docstring); ``density``: the share of each task's triplets kept."""
    active, numbers, dtype, zero = taking_part(factors, weights)
    if zero is not None:
        return zero
    tasks = [task_singular_vectors(f, kept_triplets(f.rank, params.density)) for f in active]
    B, A = whiten_and_combine(tasks, numbers)
    return finish(A, B, params, dtype)


register(
    MergeMethod(
        name="tsv",
        merge=merge_tsv,
        space="delta",
        summary="keep each task's top `density` singular triplets, whiten the concatenated U and V "
        "(polar factor), U⊥ Σ V⊥ᵀ (exact SVDs from the factors, never dense; rank Σ k_i)",
        reference=TSV,
        uses_density=True,
    )
)
