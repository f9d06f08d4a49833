"""The fused CAT layer.

For one adapted module with frozen base ``W0`` and adapters ``i = 1..K`` (``A_i (r_i×in)``,
``B_i (out×r_i)``, scale ``s_i``), CAT computes (LoRA Soups, https://arxiv.org/abs/2410.13025)::

    y = W0 x + Σ_i w_i · s_i · B_i A_i x

with one learnable weight ``w_i`` per adapter (per module, per layer or global). Looping over adapters
launches 2K GEMMs; instead the factors are concatenated once, ``A = [A_1; …; A_K] (R×in)``,
``B = [B_1 … B_K] (out×R)``, and with the per-rank coefficients ``c = repeat(w_i·s_i, r_i) (R,)``::

    y = W0 x + B (c ⊙ (A x))

which is two GEMMs for any K. A and B are buffers: frozen, no gradient, no optimizer state. The
gradient of ``w_i`` is the block sum of ``∂L/∂c`` over adapter i's rank rows, which autograd derives
from the gather below.

Each module reads its coefficients from the whole weight table through a fixed index buffer
(``coeff_index``), not a Python int, so every decoder layer traces to the same graph and
``torch.compile`` of one layer serves all of them.

**Populations** (gradient-free search, LoraHub https://arxiv.org/abs/2307.13269): while
``CatWeights.population`` holds effective weights ``W (P, G, K)`` of P candidates, every layer computes
per-candidate coefficients ``c (P, R)`` and reads the batch as candidate-major: rows ``b`` of a batch of
B use candidate ``b // (B / P)``. P candidates × k examples then run as one forward of ``P·k`` rows
instead of P forwards of k rows. Without a population the layer computes exactly what it did before.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

Parameterisation = Literal["softmax", "free"]


class CatWeights(nn.Module):
    """The only trainable tensor of a CAT model: ``θ (G, K)`` for G weight groups and K adapters.

    ``softmax`` (the paper's code): ``w = softmax(θ)`` over adapters, so each group's weights sum to 1.
    ``free``: ``w = θ``, the plain weighted sum (init 1.0 is the unweighted sum of the adapters).
    """

    def __init__(self, theta: Tensor, parameterisation: Parameterisation) -> None:
        super().__init__()
        if parameterisation not in ("softmax", "free"):
            raise ValueError(f"parameterisation must be 'softmax' or 'free', not {parameterisation!r}")
        self.parameterisation = parameterisation
        self.theta = nn.Parameter(theta.detach().clone().float())
        # Effective weights (P, G, K) of P candidates scored in one batch, or None (the normal path).
        # A plain attribute: not a buffer, not saved, and θ is bypassed while it is set.
        self.population: Tensor | None = None

    def activate(self, theta: Tensor) -> Tensor:
        """θ → w along the last (adapter) dimension; works on the table, a row, or θ0."""
        return torch.softmax(theta, dim=-1) if self.parameterisation == "softmax" else theta

    def forward(self) -> Tensor:
        """Effective weights ``w (G, K)``."""
        return self.activate(self.theta)

    def full_theta(self) -> Tensor:
        """θ whole: FSDP2's ``fully_shard`` leaves a DTensor shard per process outside forward, and
        gathering it is a collective (every process calls this then); otherwise θ itself."""
        return self.theta.full_tensor() if hasattr(self.theta, "full_tensor") else self.theta

    def gather_(self) -> None:
        """Make θ one whole plain parameter again after FSDP2 sharded it (a collective, see
        :meth:`full_theta`). No-op otherwise, so an optimizer holding θ keeps holding it."""
        if hasattr(self.theta, "full_tensor"):
            self.theta = nn.Parameter(self.full_theta().detach().clone())

    def set_population(self, weights: Tensor) -> None:
        """Route every ``CatLinear`` through P candidates: ``weights (P, G, K)``, effective (not θ).

        The batch size of each forward must then be a multiple of P, laid out candidate-major. The
        weights are detached (the search is gradient-free) and kept in float32 on θ's device.
        """
        if weights.dim() != 3 or tuple(weights.shape[1:]) != tuple(self.theta.shape):
            raise ValueError(
                f"population weights must have shape (P, {', '.join(map(str, self.theta.shape))}), "
                f"got {tuple(weights.shape)}"
            )
        self.population = weights.detach().to(device=self.theta.device, dtype=torch.float32)

    def clear_population(self) -> None:
        self.population = None

    @contextmanager
    def candidates(self, weights: Tensor) -> Iterator[None]:
        """``with weights.candidates(W):`` score the population ``W (P, G, K)``, then back to θ."""
        self.set_population(weights)
        try:
            yield
        finally:
            self.clear_population()

    def extra_repr(self) -> str:
        groups, adapters = self.theta.shape
        return f"groups={groups}, adapters={adapters}, parameterisation={self.parameterisation}"


def store_fused_factors(module: nn.Module, A: Tensor, B: Tensor, rank_owner: Tensor, scales: Tensor) -> None:
    """The frozen concatenated factors as non-persistent buffers (they move with the module, never
    reach its state dict, and get no gradient): ``A (R, in)``, ``B (out, R)``, ``rank_owner (R,)``,
    ``scales (K,)``."""
    module.register_buffer("A", A.detach().clone(), persistent=False)
    module.register_buffer("B", B.detach().clone(), persistent=False)
    module.register_buffer("rank_owner", rank_owner.long(), persistent=False)
    module.register_buffer("scales", scales.float(), persistent=False)


class CatLinear(nn.Module):
    """A frozen linear module plus the fused CAT update (see the module docstring).

    Shapes: ``A (R, in)``, ``B (out, R)``, ``rank_owner (R,)`` (the adapter index of each rank row),
    ``scales (K,)`` (``s_i`` of each adapter at this module; irrelevant where ``r_i = 0``).
    The module has no Python loop over adapters and no data-dependent control flow, so
    ``torch.compile`` captures it whole.
    ``base`` may be ``nn.Linear`` or GPT-2's ``Conv1D``: only its forward is used.
    """

    def __init__(
        self,
        base: nn.Module,
        A: Tensor,
        B: Tensor,
        rank_owner: Tensor,
        scales: Tensor,
        weights: CatWeights,
        group: int,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.base = base
        store_fused_factors(self, A, B, rank_owner, scales)
        # Shared with every CatLinear of the model and registered once at the model root; a plain
        # attribute keeps it out of this module's children, so it is neither duplicated nor moved twice.
        object.__setattr__(self, "cat_weights", weights)
        self.group = group
        adapters = scales.numel()
        # Rank row r reads w[group, owner(r)] from the flattened (G, K) table and scales it by s_owner(r).
        self.register_buffer("coeff_index", group * adapters + rank_owner.long(), persistent=False)
        self.register_buffer("rank_scales", scales.float()[rank_owner.long()], persistent=False)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def rank_coefficients(self) -> Tensor:
        """``c (R,) = repeat(w_i · s_i, r_i)`` in float32."""
        return self.cat_weights().flatten()[self.coeff_index] * self.rank_scales  # (R,)

    def forward(self, x: Tensor) -> Tensor:
        population = self.cat_weights.population
        if population is not None:  # a guard for torch.compile, not a graph break
            return self.population_forward(x, population)
        c = self.rank_coefficients().to(x.dtype)  # (R,)
        z = F.linear(self.dropout(x), self.A) * c  # (..., R)
        return self.base(x) + F.linear(z, self.B)  # (..., out)

    def population_forward(self, x: Tensor, population: Tensor) -> Tensor:
        """``x (B, ..., in)``: rows ``b`` use candidate ``b // (B / P)`` of ``population (P, G, K)``."""
        c = (population.flatten(1)[:, self.coeff_index] * self.rank_scales).to(x.dtype)  # (P, R)
        candidates, rows = c.shape[0], x.shape[0]
        if rows % candidates:
            raise ValueError(f"a batch of {rows} rows cannot be split evenly among {candidates} candidates")
        z = F.linear(self.dropout(x), self.A)  # (B, ..., R)
        z = z.unflatten(0, (candidates, rows // candidates))  # (P, B/P, ..., R)
        z = z * c.view(candidates, *([1] * (z.dim() - 2)), -1)  # c broadcast over rows and positions
        return self.base(x) + F.linear(z.flatten(0, 1), self.B)  # (B, ..., out)

    def extra_repr(self) -> str:
        return f"rank={self.A.shape[0]}, group={self.group}"
