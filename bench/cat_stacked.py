"""An experiment for issue 23, measured by ``bench/cat_step.py --variants cat_stacked``; not the
library's layer until a GPU says it pays.

Under CUDA graphs CAT costs 1.17–1.20× the frozen floor (docs/benchmarks.md), and the profile puts
most of the extra kernel time in the thin GEMMs (four per module: ``x Aᵀ`` and ``(c ⊙ z) Bᵀ``
forward, ``g B`` and ``dz A`` backward, rank 64–128, poorly shaped for the tensor cores) and in the
adds beside them. Already tried without gain (docs/cat.md): the updates added in GEMM epilogues.
Tried here: **one frozen matrix ``[W0; A] ((out + R) × in)``** per module, so that

    [y0 | z] = x [W0; A]ᵀ           one GEMM where there were two: x is read once
    y = y0 + (c ⊙ z) Bᵀ
    ∂L/∂x = [∂L/∂y0 | ∂L/∂z] [W0; A]  one GEMM where there were two GEMMs and an add

(the concatenated gradient is the split's backward, one pointwise kernel under compile). ``W0``
becomes a view of the stacked matrix, so the base's weight costs no second copy; :func:`unstack`
gives every module its own ``W0`` and ``A`` back, bit for bit.
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
        base = layer.base
        if type(base) is not nn.Linear or not isinstance(layer.dropout, nn.Identity):
            raise ValueError("stacking needs a plain nn.Linear base and no LoRA dropout")
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
        c = self.layer.rank_coefficients().to(x.dtype)  # (R,)
        y0, z = F.linear(x, self.stacked, self.stacked_bias).split([self.out, c.shape[0]], dim=-1)
        # z's own copy: the product's backward saves z, and a view would keep the whole (..., out + R)
        # output alive until the backward (on an H100, +1.7 GiB for a 7B step at 4 × 256 tokens)
        return y0 + F.linear(z.contiguous() * c, self.layer.B)  # (..., out)


def stack(model: nn.Module) -> int:
    """Replace every ``CatLinear`` of ``model`` by its stacked form; returns how many."""
    paths = [path for path, module in model.named_modules() if isinstance(module, CatLinear)]
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
