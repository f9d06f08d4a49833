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
"""

from __future__ import annotations

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

    def activate(self, theta: Tensor) -> Tensor:
        """θ → w along the last (adapter) dimension; works on the table, a row, or θ0."""
        return torch.softmax(theta, dim=-1) if self.parameterisation == "softmax" else theta

    def group_weights(self, group: int) -> Tensor:
        """``w (K,)`` of one group: only that row's softmax, so each module's graph stays small."""
        return self.activate(self.theta[group])

    def forward(self) -> Tensor:
        """Effective weights ``w (G, K)``."""
        return self.activate(self.theta)

    def extra_repr(self) -> str:
        groups, adapters = self.theta.shape
        return f"groups={groups}, adapters={adapters}, parameterisation={self.parameterisation}"


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
        self.register_buffer("A", A.detach().clone(), persistent=False)
        self.register_buffer("B", B.detach().clone(), persistent=False)
        self.register_buffer("rank_owner", rank_owner.long(), persistent=False)
        self.register_buffer("scales", scales.float(), persistent=False)
        # Shared with every CatLinear of the model and registered once at the model root; a plain
        # attribute keeps it out of this module's children, so it is neither duplicated nor moved twice.
        object.__setattr__(self, "cat_weights", weights)
        self.group = group
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def rank_coefficients(self) -> Tensor:
        """``c (R,) = repeat(w_i · s_i, r_i)`` in float32."""
        w = self.cat_weights.group_weights(self.group)  # (K,)
        return (w * self.scales)[self.rank_owner]  # (R,)

    def forward(self, x: Tensor) -> Tensor:
        # Out of place: torch.compile functionalises an in-place addmm_ into the base output, which
        # may add full-size copies (not yet timed against this version at the same K).
        c = self.rank_coefficients().to(x.dtype)  # (R,)
        z = F.linear(self.dropout(x), self.A) * c  # (..., R)
        return self.base(x) + F.linear(z, self.B)  # (..., out)

    def extra_repr(self) -> str:
        return f"rank={self.A.shape[0]}, group={self.group}"
