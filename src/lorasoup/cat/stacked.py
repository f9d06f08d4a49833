"""CAT's layer with the base weight and ``A`` in one frozen matrix, for training under CUDA graphs.

For one module (``lorasoup.cat.layer``: ``y = W0 x + B (c ⊙ (A x))``), the base ``W0 (out × in)`` and
the concatenated ``A (R × in)`` both multiply ``x``. Stacked as one frozen ``[W0; A] ((out + R) × in)``::

    [y0 | z] = x [W0; A]ᵀ           one GEMM where there were two: x is read once
    y = y0 + (c ⊙ z) Bᵀ
    ∂L/∂x = [∂L/∂y0 | ∂L/∂z] [W0; A]  one GEMM where there were two GEMMs and an add

(the concatenated gradient is the split's backward, one pointwise kernel under compile). ``W0``
becomes a view of the stacked matrix, so the base's weight costs no second copy, and :func:`unstack`
gives every module its own ``W0`` and ``A`` back, bit for bit.

Measured on an H100 (docs/benchmarks.md, 7B shape, r = 32 per adapter, 4 × 256 tokens, CUDA graphs):
1.12× / 1.14× the frozen floor's step at K = 2 / 4 against the plain layer's 1.16× / 1.18×, peak
memory within 0.04 GiB of it. Under plain ``torch.compile`` both are host-bound and the stacked layer
is not reliably faster, so ``lorasoup.cat.fit`` stacks only for ``train.compile: reduce-overhead`` on
one CUDA device, and unstacks when training ends (export and scoring read the plain layer).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lorasoup.cat.layer import CatLinear
from lorasoup.sites import replace_module


class StackedCatLinear(nn.Module):
    """A :class:`CatLinear` whose base ``nn.Linear`` weight and ``A`` share one ``(out + R, in)``
    buffer. Shapes as ``CatLinear``: ``x (..., in)`` → ``(..., out)``."""

    def __init__(self, layer: CatLinear) -> None:
        super().__init__()
        if not stackable(layer):
            raise ValueError("stacking needs a plain nn.Linear base and no LoRA dropout")
        base = layer.base
        self.layer, self.out, self.a_dtype = layer, base.out_features, layer.A.dtype
        stacked = torch.cat([base.weight.detach(), layer.A.to(base.weight.dtype)])  # (out + R, in)
        self.register_buffer("stacked", stacked, persistent=False)
        bias = None
        if base.bias is not None:
            bias = torch.cat([base.bias.detach(), base.bias.new_zeros(layer.A.shape[0])])
        self.register_buffer("stacked_bias", bias, persistent=False)
        # views into the stacked buffer: the old W0 and A storages are freed, so memory stays as it was
        base.weight = nn.Parameter(stacked[: self.out], requires_grad=False)
        layer.A = stacked[self.out :]

    def forward(self, x: Tensor) -> Tensor:
        population = self.layer.cat_weights.population
        if population is not None:  # a search's candidates: the plain layer's path (a guard, not a break)
            return self.layer.population_forward(x, population)
        c = self.layer.rank_coefficients().to(x.dtype)  # (R,)
        y0, z = F.linear(x, self.stacked, self.stacked_bias).split([self.out, c.shape[0]], dim=-1)
        # z's own copy: the product's backward saves z, and a view would keep the whole (..., out + R)
        # output alive until the backward (on an H100, +1.7 GiB for a 7B step at 4 × 256 tokens)
        return y0 + F.linear(z.contiguous() * c, self.layer.B)  # (..., out)


def stackable(layer: CatLinear) -> bool:
    """A plain ``nn.Linear`` base (not GPT-2's ``Conv1D``, not a quantized layer) and no LoRA dropout,
    whose mask applies to ``A``'s input only."""
    return type(layer.base) is nn.Linear and isinstance(layer.dropout, nn.Identity)


def stack(model: nn.Module) -> int:
    """Replace every stackable ``CatLinear`` of ``model`` by its stacked form; returns how many.

    Stack a model already on its device: ``.to(other)`` moves each buffer and parameter on its own,
    so ``W0`` and ``A`` would become copies beside the stacked matrix (twice their memory)."""
    paths = [
        path for path, module in model.named_modules() if isinstance(module, CatLinear) and stackable(module)
    ]
    for path in paths:
        replace_module(model, path, StackedCatLinear(model.get_submodule(path)))
    return len(paths)


def unstack(model: nn.Module) -> None:
    """Put the ``CatLinear`` modules back, each with its own contiguous ``W0`` and ``A``."""
    paths = [path for path, module in model.named_modules() if isinstance(module, StackedCatLinear)]
    for path in paths:
        wrapper: StackedCatLinear = model.get_submodule(path)
        layer = wrapper.layer
        layer.base.weight = nn.Parameter(wrapper.stacked[: wrapper.out].clone(), requires_grad=False)
        layer.A = wrapper.stacked[wrapper.out :].to(wrapper.a_dtype, copy=True)
        replace_module(model, path, layer)
