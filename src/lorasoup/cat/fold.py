"""Fold learned CAT weights into plain LoRA factors (exact).

With ``c = repeat(w_i·s_i, r_i)`` the CAT update of a module is ``B (c ⊙ (A x)) = B diag(c) A x``, so
``A' = diag(c) A`` and ``B' = B`` give one ordinary LoRA of rank R at scale 1 (``lora_alpha = r``).
Modules with fewer rank rows than the largest are padded with zero rows, which changes nothing.
"""

from __future__ import annotations

import torch
from torch import Tensor

from lorasoup.adapters import LoraFactors
from lorasoup.cat.inject import CatComposition
from lorasoup.export.serving import pad_rank


def fold_factors(A: Tensor, B: Tensor, coefficients: Tensor) -> tuple[Tensor, Tensor]:
    """``A (R, in)``, ``B (out, R)``, ``c (R,)`` → ``(diag(c) A, B)``; inputs are not modified.
    ``c`` may live on another device than the factors (a CPU table for CUDA factors)."""
    return coefficients.to(device=A.device, dtype=A.dtype)[:, None] * A, B.clone()


def fold_composition(
    composition: CatComposition, *, dtype: torch.dtype = torch.float32, rank: int | None = None
) -> dict[str, LoraFactors]:
    """Every module's folded ``(A', B')`` at scale 1 on the CPU, all padded to one rank.

    The folding is done in float32 whatever the model's dtype, then cast to ``dtype``. ``rank``
    defaults to the largest concatenated rank of any module.
    """
    layers = composition.layers()
    target = rank or max(layer.A.shape[0] for layer in layers.values())
    folded = {}
    with torch.no_grad():
        for path, layer in layers.items():
            A, B = fold_factors(layer.A.float().cpu(), layer.B.float().cpu(), layer.rank_coefficients().cpu())
            A, B = pad_rank(A, B, target)
            folded[path] = LoraFactors(A.to(dtype).contiguous(), B.to(dtype).contiguous(), 1.0)
    return folded
