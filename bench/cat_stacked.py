"""Experiments for issue 23, measured by ``bench/cat_step.py --variants cat_stacked cat_leaves
cat_stacked_leaves``; not the library's layer until a GPU says they pay.

Under CUDA graphs CAT costs 1.17–1.20× the frozen floor (docs/benchmarks.md), and the profile puts
most of the extra kernel time in the thin GEMMs (four per module: ``x Aᵀ`` and ``(c ⊙ z) Bᵀ``
forward, ``g B`` and ``dz A`` backward, rank 64–128, poorly shaped for the tensor cores) and in the
adds beside them; under plain compile CAT is host-bound (~12 more launches per module than the
floor). Already tried without gain (docs/cat.md): the updates added in GEMM epilogues. Tried here:

**Stacked** (``stacked=True``): one frozen matrix ``[W0; A] ((out + R) × in)`` per module, so that

    [y0 | z] = x [W0; A]ᵀ           one GEMM where there were two: x is read once
    y = y0 + (c ⊙ z) Bᵀ
    ∂L/∂x = [∂L/∂y0 | ∂L/∂z] [W0; A]  one GEMM where there were two GEMMs and an add

(the concatenated gradient is the split's backward, one pointwise kernel under compile). ``W0``
becomes a view of the stacked matrix, so the base's weight costs no second copy.

**Leaves** (``leaves=True``, module granularity only): each module reads its own ``θ_g (K,)``
parameter instead of gathering its row from the shared ``(G, K)`` table, whose backward writes a
fresh zero-filled ``(G, K)`` table per module (the gather's backward, docs/benchmarks.md): two
launches fewer per module in backward, which matters where launches do (plain compile).

:func:`unstack` gives every module its own ``W0`` and ``A`` back, bit for bit, and copies the
leaves' values into ``θ``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lorasoup.cat.layer import CatLinear


class ExperimentalCatLinear(nn.Module):
    """A :class:`CatLinear` computed the stacked way, from its own θ leaf, or both (module
    docstring). Shapes as ``CatLinear``: ``x (..., in)`` → ``(..., out)``."""

    def __init__(self, layer: CatLinear, *, stacked: bool, leaves: bool) -> None:
        super().__init__()
        base = layer.base
        self.layer, self.out, self.a_dtype = layer, base.out_features, layer.A.dtype
        self.leaf = nn.Parameter(layer.cat_weights.theta.detach()[layer.group].clone()) if leaves else None
        self.register_buffer("stacked", None, persistent=False)
        self.register_buffer("stacked_bias", None, persistent=False)
        if stacked:
            if type(base) is not nn.Linear or not isinstance(layer.dropout, nn.Identity):
                raise ValueError("stacking needs a plain nn.Linear base and no LoRA dropout")
            stacked_weight = torch.cat([base.weight.detach(), layer.A.to(base.weight.dtype)])  # (out + R, in)
            self.stacked = stacked_weight
            if base.bias is not None:
                self.stacked_bias = torch.cat([base.bias.detach(), base.bias.new_zeros(layer.A.shape[0])])
            # views into the stacked buffer: the old W0 and A storages are freed, so memory stays as it was
            base.weight = nn.Parameter(stacked_weight[: self.out], requires_grad=False)
            layer.A = stacked_weight[self.out :]

    def coefficients(self) -> Tensor:
        """``c (R,)`` float32: from the shared table, or from this module's own leaf."""
        if self.leaf is None:
            return self.layer.rank_coefficients()
        return self.layer.cat_weights.activate(self.leaf)[self.layer.rank_owner] * self.layer.rank_scales

    def forward(self, x: Tensor) -> Tensor:
        c = self.coefficients().to(x.dtype)  # (R,)
        if self.stacked is None:
            z = F.linear(self.layer.dropout(x), self.layer.A) * c  # (..., R)
            return self.layer.base(x) + F.linear(z, self.layer.B)
        y0, z = F.linear(x, self.stacked, self.stacked_bias).split([self.out, c.shape[0]], dim=-1)
        return y0 + F.linear(z * c, self.layer.B)  # (..., out)


def stack(model: nn.Module, *, stacked: bool = True, leaves: bool = False) -> list[nn.Parameter]:
    """Replace every ``CatLinear`` of ``model`` by its experimental form; returns the parameters to
    train (the leaves in the order of θ's rows; empty without ``leaves``: then θ trains as before)."""
    paths = [path for path, module in model.named_modules() if isinstance(module, CatLinear)]
    if leaves:
        groups = [model.get_submodule(path).group for path in paths]
        if len(set(groups)) != len(groups):
            raise ValueError("θ leaves need one weight group per module (granularity 'module')")
    trained = {}
    for path in paths:
        parent_path, _, child = path.rpartition(".")
        parent = model.get_submodule(parent_path) if parent_path else model
        wrapper = ExperimentalCatLinear(getattr(parent, child), stacked=stacked, leaves=leaves)
        setattr(parent, child, wrapper)
        if wrapper.leaf is not None:
            trained[wrapper.layer.group] = wrapper.leaf
    return [trained[group] for group in sorted(trained)]


def unstack(model: nn.Module) -> None:
    """Put the ``CatLinear`` modules back, each with its own contiguous ``W0`` and ``A``, and θ holding
    the leaves' values."""
    paths = [path for path, module in model.named_modules() if isinstance(module, ExperimentalCatLinear)]
    for path in paths:
        parent_path, _, child = path.rpartition(".")
        parent = model.get_submodule(parent_path) if parent_path else model
        wrapper: ExperimentalCatLinear = getattr(parent, child)
        layer = wrapper.layer
        if wrapper.stacked is not None:
            layer.base.weight = nn.Parameter(wrapper.stacked[: wrapper.out].clone(), requires_grad=False)
            layer.A = wrapper.stacked[wrapper.out :].to(wrapper.a_dtype, copy=True)
        if wrapper.leaf is not None:
            with torch.no_grad():
                layer.cat_weights.theta[layer.group] = wrapper.leaf
        setattr(parent, child, layer)
