"""Why a composition works (or does not): geometry of the skills' LoRAs and what recompression costs.

Four diagnostics, each a pure tensor function with an adapter-level wrapper that streams one module at
a time (nothing of a whole model is densified at once):

- **Principal angles** between two adapters' subspaces, per module (Björck & Golub 1973,
  https://doi.org/10.1090/S0025-5718-1973-0348991-3): for ``ΔW_i = s_i B_i A_i`` the update writes
  into the column space of ``B_i`` (output side) and reads from the row space of ``A_i`` (input
  side). With orthonormal bases ``Q_i`` (thin QR), the singular values of ``Q_iᵀ Q_j`` are the cosines
  of the principal angles. 0° everywhere: the skills use the same directions (they compete); 90°:
  disjoint directions (concatenation adds them without interference). Random subspaces of the same
  sizes give the baseline (:func:`random_subspace_angles`): in a small model they are far from 90°.
- **TIES sign conflicts** per module (Yadav et al. 2023, https://arxiv.org/abs/2306.01708): after
  trimming each task vector ``τ_i = ΔW_i`` to its top ``density`` entries by magnitude, the fraction
  of entries where the kept values disagree in sign: what TIES' sign election must arbitrate.
- **Recompression energy kept** per module vs rank: for ``ΔW = B A`` with singular values ``σ_j``,
  rank ``k`` keeps ``Σ_{j≤k} σ_j² / Σ_j σ_j²`` of ``‖ΔW‖_F²`` (Eckart–Young), computed from the
  factors by :func:`lorasoup.lowrank.recompress`.
- **Accuracy vs rank**: the adapter recompressed to each rank (exact truncated SVD per module,
  :func:`lorasoup.lowrank.recompress_modules`) and scored with
  :func:`lorasoup.evaluation.runner.evaluate_model` (:func:`accuracy_vs_rank`).
"""

from __future__ import annotations

import itertools
import math
import tempfile
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from lorasoup.adapters import LoraAdapter, LoraFactors
from lorasoup.lowrank import recompress, recompress_modules
from lorasoup.merging.ops import keep_top_magnitude

if TYPE_CHECKING:
    from lorasoup.evaluation.generate import GenerationSettings
    from lorasoup.evaluation.tasks import Example, SandboxOptions, Task

ModuleProgress = Callable[[int, int], None]


# --- principal angles ---------------------------------------------------------------------------


def orthonormal_basis(matrix: Tensor, *, rtol: float = 1e-7) -> Tensor:
    """Orthonormal columns spanning the column space of ``matrix (n, p)``: ``(n, q)``, float64.

    Thin QR when ``matrix`` has full column rank (``|R_jj| > rtol · max |R_jj|``); otherwise the left
    singular vectors of the singular values above ``rtol · σ_1``, so a rank-deficient factor (a LoRA
    whose ``B`` is still zero, repeated columns) gives its true dimension ``q < p``. A zero matrix
    gives ``(n, 0)``.
    """
    work = matrix.detach().double()
    if work.numel() == 0:
        return work.new_zeros(work.shape[0], 0)
    Q, R = torch.linalg.qr(work)  # (n, m), (m, p) with m = min(n, p)
    diagonal = R.diagonal().abs()
    if work.shape[1] <= work.shape[0] and float(diagonal.min()) > rtol * float(diagonal.max()):
        return Q
    U, S, _ = torch.linalg.svd(work, full_matrices=False)
    if S.numel() == 0 or float(S[0]) == 0.0:
        return work.new_zeros(work.shape[0], 0)
    return U[:, rtol * S[0] < S]


def principal_angles(X: Tensor, Y: Tensor) -> Tensor:
    """Principal angles, in degrees and ascending, between the column spaces of ``X`` and ``Y``.

    ``X (n, p)``, ``Y (n, q)`` → ``(min(dim X, dim Y),)`` float64, each in [0, 90]. Cosines are the
    singular values of ``Q_Xᵀ Q_Y`` (clamped to [0, 1] against round-off). Empty when either space is
    ``{0}``.
    """
    if X.shape[0] != Y.shape[0]:
        raise ValueError(f"subspaces of different ambient sizes: {tuple(X.shape)} and {tuple(Y.shape)}")
    Q_x, Q_y = orthonormal_basis(X), orthonormal_basis(Y)
    if Q_x.shape[1] == 0 or Q_y.shape[1] == 0:
        return Q_x.new_zeros(0)
    cosines = torch.linalg.svdvals(Q_x.T @ Q_y).clamp(0.0, 1.0)  # (min(qx, qy),) descending
    return torch.rad2deg(torch.arccos(cosines))


@dataclass(frozen=True)
class ModuleAngles:
    """Principal angles (degrees, ascending) between two LoRAs at one module.

    ``column``: output side, column spaces of ``B_i (out, r_i)`` and ``B_j``; ``row``: input side, row
    spaces of ``A_i (r_i, in)`` and ``A_j``.
    """

    column: Tensor
    row: Tensor

    @staticmethod
    def _mean(angles: Tensor) -> float:
        return float(angles.mean()) if angles.numel() else math.nan

    @property
    def column_mean(self) -> float:
        return self._mean(self.column)

    @property
    def row_mean(self) -> float:
        return self._mean(self.row)

    @property
    def column_min(self) -> float:
        return float(self.column[0]) if self.column.numel() else math.nan

    @property
    def row_min(self) -> float:
        return float(self.row[0]) if self.row.numel() else math.nan


def lora_angles(first: LoraFactors, second: LoraFactors) -> ModuleAngles:
    """Principal angles between two LoRAs of one module (scales do not change a subspace)."""
    return ModuleAngles(
        column=principal_angles(first.B, second.B), row=principal_angles(first.A.T, second.A.T)
    )


def random_subspace_angles(n: int, p: int, q: int, generator: torch.Generator, *, draws: int = 8) -> float:
    """Mean principal angle (degrees) between random ``p``- and ``q``-dimensional subspaces of R^n.

    The baseline that tells a measured angle apart from chance: Gaussian matrices span uniformly
    random subspaces; the mean is over ``draws`` pairs drawn from ``generator``.
    """
    angles = [
        principal_angles(
            torch.randn(n, p, generator=generator, dtype=torch.float64),
            torch.randn(n, q, generator=generator, dtype=torch.float64),
        ).mean()
        for _ in range(draws)
    ]
    return float(torch.stack(angles).mean())


def adapter_angles(
    adapters: Sequence[LoraAdapter], *, progress: ModuleProgress | None = None
) -> dict[tuple[str, str], dict[str, ModuleAngles]]:
    """Angles for every pair of adapters, at every module both adapt: ``{(name_i, name_j): {path: …}}``."""
    pairs = list(itertools.combinations(adapters, 2))
    result: dict[tuple[str, str], dict[str, ModuleAngles]] = {}
    done, total = 0, sum(len(shared_modules([a, b])) for a, b in pairs)
    for first, second in pairs:
        per_module: dict[str, ModuleAngles] = {}
        for path in shared_modules([first, second]):
            per_module[path] = lora_angles(first.modules[path], second.modules[path])
            done += 1
            if progress is not None:
                progress(done, total)
        result[(first.name, second.name)] = per_module
    return result


def shared_modules(adapters: Iterable[LoraAdapter]) -> list[str]:
    """Module paths every adapter adapts, sorted."""
    sets = [set(a.modules) for a in adapters]
    return sorted(set.intersection(*sets)) if sets else []


# --- TIES sign conflicts -----------------------------------------------------------------------


@dataclass(frozen=True)
class SignConflict:
    """Sign disagreement of trimmed task vectors at one module.

    ``conflict``: fraction of all entries where the kept values of two or more tasks have opposite
    signs; ``overlap``: fraction where two or more tasks keep a value; ``entries``: ``out · in``.
    """

    conflict: float
    overlap: float
    entries: int

    @property
    def conflict_given_overlap(self) -> float:
        """Among entries two or more tasks keep, the share whose signs disagree (NaN if none)."""
        return self.conflict / self.overlap if self.overlap > 0 else math.nan


def sign_conflicts(tasks: Tensor, density: float) -> SignConflict:
    """TIES sign conflicts of ``tasks (K, *shape)`` after trimming each to its top ``density`` entries.

    Trimming is TIES' own (:func:`lorasoup.merging.ops.keep_top_magnitude`, per task); zero entries do
    not vote. Pure: ``tasks`` is not modified.
    """
    if tasks.shape[0] < 2:
        raise ValueError(f"sign conflicts need at least two tasks, got {tasks.shape[0]}")
    trimmed = torch.stack([keep_top_magnitude(t, density) for t in tasks])  # (K, *shape)
    positive = (trimmed > 0).any(dim=0)
    negative = (trimmed < 0).any(dim=0)
    kept = (trimmed != 0).sum(dim=0)
    entries = positive.numel()
    return SignConflict(
        conflict=float((positive & negative).sum()) / entries,
        overlap=float((kept >= 2).sum()) / entries,
        entries=entries,
    )


def adapter_sign_conflicts(
    adapters: Sequence[LoraAdapter], density: float, *, progress: ModuleProgress | None = None
) -> dict[str, SignConflict]:
    """:func:`sign_conflicts` of the adapters' dense updates ``ΔW_i = s_i B_i A_i``, module by module.

    Covers modules that two or more adapters adapt; an adapter without the module casts no vote (as
    in a TIES merge). Only one module's ``(K, out, in)`` stack exists at a time.
    """
    paths = sorted({p for a in adapters for p in a.modules if sum(p in b.modules for b in adapters) >= 2})
    result: dict[str, SignConflict] = {}
    for done, path in enumerate(paths, start=1):
        tasks = torch.stack([a.modules[path].delta(torch.float32) for a in adapters if path in a.modules])
        result[path] = sign_conflicts(tasks, density)
        if progress is not None:
            progress(done, len(paths))
    return result


# --- recompression energy ----------------------------------------------------------------------


def energy_kept(singular_values: Tensor) -> Tensor:
    """Share of ``‖ΔW‖_F²`` kept at rank ``k = 1..n``: ``(n,)`` float64, non-decreasing, ends at 1.

    ``singular_values (n,)`` in descending order. A zero update keeps everything at every rank (1s).
    """
    squares = singular_values.double().square()
    total = squares.sum()
    if float(total) == 0.0:
        return torch.ones_like(squares)
    return squares.cumsum(0) / total


def module_energy(A: Tensor, B: Tensor) -> Tensor:
    """:func:`energy_kept` of ``ΔW = B @ A`` (``A (R, in)``, ``B (out, R)``) from its factors alone."""
    return energy_kept(recompress(A, B).singular_values)


def adapter_energy(adapter: LoraAdapter, *, progress: ModuleProgress | None = None) -> dict[str, Tensor]:
    """Energy-kept curve of every module of ``adapter``: ``{path: (n,)}`` (the scale cancels out)."""
    result: dict[str, Tensor] = {}
    for done, path in enumerate(sorted(adapter.modules), start=1):
        factors = adapter.modules[path]
        result[path] = module_energy(factors.A.float(), factors.B.float())
        if progress is not None:
            progress(done, len(adapter.modules))
    return result


def energy_at(curve: Tensor, rank: int) -> float:
    """Energy kept at ``rank`` from a curve of :func:`energy_kept` (1 beyond its length)."""
    return 1.0 if rank >= curve.numel() else float(curve[rank - 1])


# --- accuracy vs rank ---------------------------------------------------------------------------


@dataclass
class RankPoint:
    """One point of :func:`accuracy_vs_rank`: ``rank`` ``None`` is the adapter as it is."""

    rank: int | None
    accuracy: float
    mean_energy_kept: float
    min_energy_kept: float
    summary: dict[str, Any] = field(default_factory=dict)


def scaled_factors(adapter: LoraAdapter) -> dict[str, LoraFactors]:
    """``{path: (s·A (r, in), B (out, r))}`` in float32: the updates at scale 1."""
    return {
        path: LoraFactors(f.A.float(), f.B.float(), f.scale).at_unit_scale()
        for path, f in adapter.modules.items()
    }


def accuracy_vs_rank(
    model: torch.nn.Module,
    tokenizer: Any,
    task: Task,
    examples: Sequence[Example],
    adapter: LoraAdapter,
    ranks: Sequence[int],
    settings: GenerationSettings | None = None,
    *,
    sandbox: SandboxOptions | None = None,
    include_full: bool = True,
    progress: Callable[[str], None] | None = None,
) -> list[RankPoint]:
    """Score ``adapter`` on ``model`` (the base, left unchanged) recompressed to each of ``ranks``.

    Each rank: every module's update truncated exactly to rank ``k`` (fewer where the module's rank is
    lower), written as a scale-1 PEFT adapter in a temporary directory, loaded with
    ``PeftModel.from_pretrained``, scored by ``evaluate_model``, then unloaded. ``include_full`` adds
    the unrecompressed adapter as the reference point (``rank=None``, energy 1).
    """
    from lorasoup.evaluation.runner import evaluate_model

    factors = scaled_factors(adapter)
    points: list[RankPoint] = []
    chosen: list[int | None] = [*sorted(set(ranks)), *([None] if include_full else [])]
    for rank in chosen:
        if progress is not None:
            progress(f"rank {rank or 'full'}")
        if rank is None:
            factors_k, kept = factors, [1.0] * len(factors)
        else:
            factors_k, facts = recompress_modules(factors, rank=rank)
            kept = [1.0 - f["discarded_energy"] for f in facts.values()]
        with _with_adapter(model, factors_k, adapter) as adapted:
            outcome = evaluate_model(adapted, tokenizer, task, examples, settings, sandbox=sandbox)
        points.append(
            RankPoint(
                rank=rank,
                accuracy=outcome.summary["accuracy"],
                mean_energy_kept=sum(kept) / len(kept),
                min_energy_kept=min(kept),
                summary=outcome.summary,
            )
        )
    return points


@contextmanager
def _with_adapter(
    model: torch.nn.Module, factors: dict[str, LoraFactors], source: LoraAdapter
) -> Iterator[torch.nn.Module]:
    """``model`` wrapped by a PEFT adapter made of ``factors`` (scale 1); unloaded on exit."""
    from peft import PeftModel

    from lorasoup.export.peft import save_peft_adapter
    from lorasoup.export.serving import pad_factors

    rank = max(f.rank for f in factors.values())
    dtype = next(model.parameters()).dtype
    padded = {p: pad_factors(f, rank, dtype) for p, f in factors.items()}
    with tempfile.TemporaryDirectory(prefix="lorasoup-rank-") as folder:
        save_peft_adapter(
            padded,
            Path(folder),
            base_model=source.base_model,
            model=model,
            fan_in_fan_out=source.fan_in_fan_out,
        )
        peft_model = PeftModel.from_pretrained(model, folder, is_trainable=False)
        try:
            yield peft_model.eval()
        finally:
            peft_model.unload()  # removes the LoRA layers; the base weights were never touched
