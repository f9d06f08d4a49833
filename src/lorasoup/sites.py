"""Site planning: where in a base model the adapters act, and their factors stacked per site.

Shared by every method that wraps base modules with a stack of adapters (CAT's ``CatLinear``, the MoE
baseline's ``GatedLoraLinear``): each adapted path must name a linear-like module of the shape the adapters
expect, and the adapters' factors at that path are concatenated once, ``A = [A_1; …; A_K] (R, in)``
and ``B = [B_1 … B_K] (out, R)``, with the owner of every rank row.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from lorasoup.adapters import LoraAdapter
from lorasoup.errors import CompatibilityError


def base_shape(module: nn.Module, path: str) -> tuple[int, int]:
    """``(out, in)`` of a linear-like base module (nn.Linear or GPT-2 Conv1D)."""
    if isinstance(module, nn.Linear):
        return module.out_features, module.in_features
    weight = getattr(module, "weight", None)
    if type(module).__name__ == "Conv1D" and weight is not None:
        return weight.shape[1], weight.shape[0]
    raise CompatibilityError(
        f"module {path} is a {type(module).__name__}; CAT supports linear layers (nn.Linear, Conv1D)"
    )


def concat_site(
    adapters: list[LoraAdapter], path: str, device: torch.device, dtype: torch.dtype
) -> tuple[Tensor, Tensor, Tensor, tuple[int, ...], tuple[float, ...]]:
    """``A (R, in)``, ``B (out, R)``, the owner of each rank row, and each adapter's rank and scale."""
    As, Bs, owner, ranks, scales = [], [], [], [], []
    for k, adapter in enumerate(adapters):
        factors = adapter.modules.get(path)
        if factors is None:
            ranks.append(0)
            scales.append(0.0)
            continue
        As.append(factors.A)
        Bs.append(factors.B)
        owner += [k] * factors.rank
        ranks.append(factors.rank)
        scales.append(factors.scale)
    A = torch.cat(As, dim=0).to(device=device, dtype=dtype)  # (R, in)
    B = torch.cat(Bs, dim=1).to(device=device, dtype=dtype)  # (out, R)
    return A, B, torch.tensor(owner, device=device), tuple(ranks), tuple(scales)


def plan_sites(
    model: nn.Module, adapters: list[LoraAdapter], paths: list[str]
) -> list[tuple[str, nn.Module]]:
    """Each path's base module, checked to exist and to have the shape the adapters expect."""
    plan = []
    for path in paths:
        try:
            base = model.get_submodule(path)
        except AttributeError:
            raise CompatibilityError(
                f"the base model has no module {path}; the adapters belong to another model"
            ) from None
        out_features, in_features = base_shape(base, path)
        some = next(a.modules[path] for a in adapters if path in a.modules)
        if (some.out_features, some.in_features) != (out_features, in_features):
            raise CompatibilityError(
                f"{path}: base module is {out_features}x{in_features} but the adapters expect "
                f"{some.out_features}x{some.in_features} (out x in); the adapters belong to another model"
            )
        plan.append((path, base))
    return plan


def replace_module(model: nn.Module, path: str, module: nn.Module) -> None:
    """Put ``module`` at ``path`` (dotted, as ``named_modules`` names it) in ``model``: a wrapper in,
    or the base back. (``nn.Module.set_submodule`` does this from torch 2.5; lorasoup supports 2.2.)"""
    parent_path, _, child = path.rpartition(".")
    setattr(model.get_submodule(parent_path) if parent_path else model, child, module)
