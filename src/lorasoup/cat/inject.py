"""Put CAT layers into a base model, and take them out again.

``compose_cat`` concatenates each module's adapter factors once, wraps the module in a ``CatLinear``
and registers a single ``CatWeights`` at the model root. Weight groups follow the granularity:
``module`` (the paper's code: one weight per adapter per adapted module), ``layer`` (per transformer
block) or ``global`` (one weight per adapter).

``weights_from_file`` reads a saved weights table (``cat_weights.json`` of a CAT run, or
``search_weights.json`` of a search) onto a composition's groups, so a search can warm-start CAT.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor, nn

from lorasoup.adapters import LoraAdapter
from lorasoup.cat.layer import CatLinear, CatWeights, Parameterisation
from lorasoup.compat import check_compatibility
from lorasoup.errors import CompatibilityError, ConfigError
from lorasoup.sites import concat_site, plan_sites, replace_module

Granularity = Literal["module", "layer", "global"]
WEIGHTS_ATTR = "lorasoup_cat_weights"
_LAYER_INDEX = re.compile(r"\.(\d+)\.")


@dataclass(frozen=True)
class CatSite:
    """One adapted module: which weight group it reads and each adapter's rank (0 = absent) and scale."""

    path: str
    group: int
    ranks: tuple[int, ...]
    scales: tuple[float, ...]


@dataclass
class CatComposition:
    """A base model with CAT layers in it, and what is needed to read, fold or remove them."""

    model: nn.Module
    weights: CatWeights
    adapter_names: list[str]
    group_names: list[str]
    sites: list[CatSite]
    granularity: Granularity
    theta_init: Tensor = field(repr=False)

    def layers(self) -> dict[str, CatLinear]:
        return {site.path: self.model.get_submodule(site.path) for site in self.sites}

    def effective_weights(self) -> Tensor:
        """``w (G, K)`` as used in the forward pass, detached, float32, on the CPU."""
        with torch.no_grad():
            return self.weights().detach().float().cpu()

    def initial_weights(self) -> Tensor:
        """``w0 (G, K)``: the effective weights at initialisation, before any training."""
        return self.weights.activate(self.theta_init.clone())

    @contextmanager
    def population(self, weights: Tensor) -> Iterator[None]:
        """Score P candidates in one batch: ``weights (P, G, K)`` effective weights; see ``cat.layer``."""
        with self.weights.candidates(weights):
            yield

    def set_effective_weights(self, w: Tensor, *, initial: bool = False) -> None:
        """Set θ so that the forward uses ``w (G, K)``; ``initial`` also makes it the starting point.

        ``free``: θ = w. ``softmax``: θ = log w, which needs every row positive and summing to 1.
        """
        w = w.detach().float().cpu()
        if tuple(w.shape) != tuple(self.weights.theta.shape):
            raise ValueError(
                f"weights must have shape {tuple(self.weights.theta.shape)}, got {tuple(w.shape)}"
            )
        if self.weights.parameterisation == "softmax":
            if (w <= 0).any() or not torch.allclose(w.sum(-1), torch.ones(len(w)), atol=1e-4):
                raise ValueError("softmax weights must be positive and sum to 1 in every group")
            w = w.log()
        with torch.no_grad():
            self.weights.theta.copy_(w)
        if initial:
            self.theta_init = w.clone()

    def weights_table(self, w: Tensor | None = None) -> dict[str, dict[str, float]]:
        """``w (G, K)`` (default: the learned weights) by group, then adapter: ``cat_weights.json``."""
        w = self.effective_weights() if w is None else w
        return {
            group: {name: float(w[g, k]) for k, name in enumerate(self.adapter_names)}
            for g, group in enumerate(self.group_names)
        }


def group_name(path: str, granularity: Granularity) -> str:
    if granularity == "module":
        return path
    if granularity == "global":
        return "global"
    match = _LAYER_INDEX.search(f".{path}.")
    return f"layer.{match.group(1)}" if match else "other"


def initial_theta(
    num_groups: int, num_adapters: int, parameterisation: Parameterisation, seed: int
) -> Tensor:
    """``θ0 (G, K)``: N(0, 1) from a private generator for ``softmax`` (as the paper's code, but
    seeded); ones for ``free`` (the plain sum of the adapters)."""
    if parameterisation == "free":
        return torch.ones(num_groups, num_adapters)
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(num_groups, num_adapters, generator=generator)


def compose_cat(
    model: nn.Module,
    adapters: list[LoraAdapter],
    *,
    granularity: Granularity = "module",
    parameterisation: Parameterisation = "softmax",
    seed: int = 0,
    dropout: float = 0.0,
    allow_base_mismatch: bool = False,
) -> CatComposition:
    """Wrap every module that any adapter adapts in a ``CatLinear``; mutate ``model`` in place.

    The base model's parameters are frozen here too: only the CAT weights train.
    """
    if not adapters:
        raise CompatibilityError("CAT needs at least one adapter")
    if hasattr(model, WEIGHTS_ATTR):
        raise CompatibilityError("this model already holds CAT layers; load a fresh base model")
    check_compatibility(
        adapters, allow_base_mismatch=allow_base_mismatch, mismatch_hint="allow_base_mismatch=True"
    ).raise_if_incompatible()
    paths = sorted({p for a in adapters for p in a.modules})
    reference = next(model.parameters())
    device, dtype = reference.device, reference.dtype

    group_names: list[str] = []
    for path in paths:
        name = group_name(path, granularity)
        if name not in group_names:
            group_names.append(name)
    theta0 = initial_theta(len(group_names), len(adapters), parameterisation, seed)
    weights = CatWeights(theta0, parameterisation).to(device)

    model.requires_grad_(False)
    plan = plan_sites(model, adapters, paths)

    sites = []
    for path, base in plan:
        A, B, owner, ranks, scales = concat_site(adapters, path, device, dtype)
        group = group_names.index(group_name(path, granularity))
        scale_tensor = torch.tensor(scales, device=device)
        replace_module(model, path, CatLinear(base, A, B, owner, scale_tensor, weights, group, dropout))
        sites.append(CatSite(path=path, group=group, ranks=ranks, scales=scales))
    model.add_module(WEIGHTS_ATTR, weights)
    return CatComposition(
        model=model,
        weights=weights,
        adapter_names=[a.name for a in adapters],
        group_names=group_names,
        sites=sites,
        granularity=granularity,
        theta_init=theta0,
    )


def weights_from_file(path: str | Path, composition: CatComposition) -> Tensor:
    """``w (G, K)`` for ``composition`` from a saved table (``cat_weights.json``/``search_weights.json``).

    The file's ``modules`` map (module path → its group) says which weights each module used, so a
    coarser table (global, per layer) spreads over finer groups; a group whose modules had different
    weights in the file cannot be represented and is an error. Adapters are matched by name.
    """
    payload = _read_weights_file(Path(path))
    missing = [name for name in composition.adapter_names if name not in payload["adapters"]]
    if missing:
        raise ConfigError(
            f"{path}: has no weights for adapter(s) {', '.join(missing)} (it has "
            f"{', '.join(payload['adapters'])}); name the adapters alike in both configs"
        )
    w = torch.empty(len(composition.group_names), len(composition.adapter_names))
    filled: dict[int, str] = {}
    for site in composition.sites:
        source_group = payload["modules"].get(site.path)
        if source_group is None:
            raise ConfigError(
                f"{path}: has no weights for module {site.path}; it was made for other adapters"
            )
        row = torch.tensor([float(payload["weights"][source_group][n]) for n in composition.adapter_names])
        if site.group in filled and not torch.equal(w[site.group], row):
            raise ConfigError(
                f"{path}: modules {filled[site.group]} and {site.path} have different weights but share "
                f"group {composition.group_names[site.group]!r}; use a granularity at least as fine as "
                f"the file's ({payload.get('granularity', '?')})"
            )
        w[site.group], filled[site.group] = row, site.path
    return w


def start_from_file(composition: CatComposition, path: str | Path) -> None:
    """Make the weights in ``path`` (see :func:`weights_from_file`) θ and θ0 of ``composition``."""
    w = weights_from_file(path, composition)
    try:
        composition.set_effective_weights(w, initial=True)
    except ValueError:
        raise ConfigError(
            f"{path}: its weights are not positive rows summing to 1, which softmax cannot represent; "
            "set cat.parameterisation: free to start from them"
        ) from None


def _read_weights_file(path: Path) -> dict[str, Any]:
    try:
        payload = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(
            f"weights file {path} does not exist; give a cat_weights.json or search_weights.json"
        ) from None
    except (OSError, ValueError) as err:
        raise ConfigError(f"{path}: cannot read a weights table ({type(err).__name__})") from None
    kinds = {"adapters": list, "weights": dict, "modules": dict}
    if not isinstance(payload, dict) or any(not isinstance(payload.get(k), t) for k, t in kinds.items()):
        raise ConfigError(f"{path}: not a weights table; it needs 'adapters', 'weights' and 'modules'")
    if not all(isinstance(group, str) for group in payload["modules"].values()):
        raise ConfigError(f"{path}: 'modules' must map each module path to its group's name")
    for group in set(payload["modules"].values()):
        row = payload["weights"].get(group)
        bad = [
            n for n in payload["adapters"] if not _is_number(row.get(n) if isinstance(row, dict) else None)
        ]
        if bad:
            raise ConfigError(f"{path}: group {group!r} has no numeric weight for {', '.join(map(str, bad))}")
    return payload


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def remove_cat(composition: CatComposition) -> nn.Module:
    """Put the original base modules back; the model is the frozen base again."""
    model = composition.model
    for path, layer in composition.layers().items():
        replace_module(model, path, layer.base)
    if hasattr(model, WEIGHTS_ATTR):
        delattr(model, WEIGHTS_ATTR)
    return model
