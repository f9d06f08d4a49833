"""Put gated LoRA layers and their routers into a base model, and take them out again.

``compose_moe`` concatenates each module's adapter factors once (``lorasoup.sites.concat_site``), wraps the
module in a ``GatedLoraLinear`` and registers every router once at the model root
(``model.lorasoup_moe_routers``, a ``ModuleList``). Router granularity:

* ``module``: one router per adapted module, reading that module's input (mergoo's LoRA MoE);
* ``layer``: one router per transformer block, reading the block's input hidden state. A forward
  pre-hook on the block computes the gates once per call and the block's gated layers all use them;
  a forward hook drops them when the block returns.

Either way the gates are computed for whatever tokens the model is given, so generation with a KV
cache works unchanged (each decoding step routes its new token).
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import Tensor, nn

from lorasoup.adapters import LoraAdapter
from lorasoup.cat.inject import WEIGHTS_ATTR, CatSite
from lorasoup.compat import check_compatibility
from lorasoup.errors import CompatibilityError, ConfigError, ModelError
from lorasoup.moe.layer import GatedLoraLinear, RouterRecord, TokenRouter, load_balancing_loss
from lorasoup.sites import base_shape, concat_site, plan_sites, replace_module

Granularity = Literal["module", "layer"]
ROUTERS_ATTR = "lorasoup_moe_routers"
_BLOCK = re.compile(r"^(.*?\.\d+)\.")


@dataclass
class MoeComposition:
    """A base model with gated LoRA layers in it, and what is needed to train, save, distill or remove them.

    ``group_names[g]`` names router ``g``: a module path (``module``) or a block path (``layer``).
    ``sites[j].group`` is the router that gates module ``sites[j].path``.
    """

    model: nn.Module
    routers: nn.ModuleList
    adapters: list[LoraAdapter] = field(repr=False)
    group_names: list[str]
    sites: list[CatSite]
    granularity: Granularity
    top_k: int | None
    renormalize: bool = False
    dropout: float = 0.0
    hooks: list[Any] = field(default_factory=list, repr=False)

    @property
    def adapter_names(self) -> list[str]:
        return [a.name for a in self.adapters]

    def layers(self) -> dict[str, GatedLoraLinear]:
        return {site.path: self.model.get_submodule(site.path) for site in self.sites}

    @contextmanager
    def recording(self) -> Iterator[list[RouterRecord]]:
        """Collect a :class:`RouterRecord` from every router call made inside the block."""
        tape: list[RouterRecord] = []
        for router in self.routers:
            router.tape = tape
        try:
            yield tape
        finally:
            for router in self.routers:
                router.tape = None

    def balance_loss(self, records: list[RouterRecord], attention_mask: Tensor | None) -> Tensor:
        """The mean over router calls of :func:`load_balancing_loss`, counting real tokens only.

        ``attention_mask (batch, seq)`` must match the routed tokens' leading shape.
        """
        if not records:
            raise ModelError("no router ran during the forward pass; is this model composed with MoE layers?")
        losses = []
        for record in records:
            mask = None
            if attention_mask is not None:
                if attention_mask.shape != record.logits.shape[:-1]:
                    raise ModelError(
                        f"router {self.group_names[record.group]} routed tokens of shape "
                        f"{tuple(record.logits.shape[:-1])} but the attention mask is "
                        f"{tuple(attention_mask.shape)}; pass (batch, seq) inputs"
                    )
                mask = attention_mask.reshape(-1)
            logits = record.logits.reshape(-1, record.logits.shape[-1])
            chosen = record.chosen.reshape(-1, record.chosen.shape[-1])
            losses.append(load_balancing_loss(logits, chosen, mask))
        return torch.stack(losses).mean()

    def router_state(self) -> dict[str, Tensor]:
        """Router tensors by group name (``<group>.weight (K, in)``, ``<group>.bias (K,)``), on the CPU."""
        state = {}
        for name, router in zip(self.group_names, self.routers, strict=True):
            state[f"{name}.weight"] = router.weight.detach().float().cpu().contiguous()
            state[f"{name}.bias"] = router.bias.detach().float().cpu().contiguous()
        return state


def block_path(path: str) -> str | None:
    """The transformer block holding a module: ``model.layers.3.mlp.up_proj`` → ``model.layers.3``."""
    match = _BLOCK.match(path)
    return match.group(1) if match else None


def hidden_size(model: nn.Module) -> int:
    """Width of the residual stream: ``config.hidden_size``, else the input embedding width."""
    size = getattr(getattr(model, "config", None), "hidden_size", None)
    if isinstance(size, int):
        return size
    embeddings = getattr(model, "get_input_embeddings", lambda: None)()
    if embeddings is None or not hasattr(embeddings, "embedding_dim"):
        raise ModelError("cannot tell this model's hidden size; use router.granularity=module")
    return int(embeddings.embedding_dim)


def _groups(plan: list[tuple[str, nn.Module]], granularity: Granularity) -> list[str]:
    """Router names in first-seen order: module paths, or the paths of the blocks holding them."""
    names: list[str] = []
    for path, _ in plan:
        name = path if granularity == "module" else block_path(path)
        if name is None:
            raise CompatibilityError(
                f"router.granularity=layer: module {path} is not inside a numbered transformer block; "
                "use router.granularity=module"
            )
        if name not in names:
            names.append(name)
    return names


def initial_router(
    in_features: int, num_adapters: int, init_std: float, generator: torch.Generator
) -> Tensor:
    """``W_r (K, in)`` ~ N(0, init_std²) from a private generator (the bias starts at zero)."""
    return torch.randn(num_adapters, in_features, generator=generator) * init_std


def _gate_block(router: TokenRouter) -> tuple[Any, Any]:
    """Forward hooks of a block: compute its router's gates from the block input, then drop them."""

    def before(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        hidden = args[0] if args else kwargs.get("hidden_states")
        if not isinstance(hidden, Tensor) or hidden.shape[-1] != router.in_features:
            got = tuple(hidden.shape) if isinstance(hidden, Tensor) else type(hidden).__name__
            raise ModelError(
                f"block {type(module).__name__} got {got}, not hidden states of width "
                f"{router.in_features}; use router.granularity=module for this model"
            )
        router.current = router(hidden)

    def after(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> None:
        router.current = None

    return before, after


def _check_request(
    model: nn.Module, adapters: list[LoraAdapter], granularity: str, top_k: int | None, renormalize: bool
) -> None:
    if not adapters:
        raise CompatibilityError("a mixture of LoRA experts needs at least one adapter")
    if granularity not in ("module", "layer"):
        raise ConfigError(f"router.granularity must be 'module' or 'layer', not {granularity!r}")
    if top_k is not None and not 1 <= top_k <= len(adapters):
        raise ConfigError(
            f"router.top_k={top_k} must be between 1 and the number of adapters ({len(adapters)})"
        )
    if renormalize and top_k == 1:
        raise ConfigError(
            "router.renormalize with top_k=1 makes every gate 1, so the router gets no gradient; "
            "set renormalize to false"
        )
    if hasattr(model, ROUTERS_ATTR) or hasattr(model, WEIGHTS_ATTR):
        raise CompatibilityError("this model already holds MoE or CAT layers; load a fresh base model")


def _build_routers(
    model: nn.Module,
    plan: list[tuple[str, nn.Module]],
    group_names: list[str],
    num_adapters: int,
    granularity: Granularity,
    *,
    top_k: int | None,
    renormalize: bool,
    init_std: float,
    seed: int,
) -> nn.ModuleList:
    generator = torch.Generator().manual_seed(seed)
    widths = {path: base_shape(base, path)[1] for path, base in plan}
    routers = nn.ModuleList()
    for g, name in enumerate(group_names):
        width = widths[name] if granularity == "module" else hidden_size(model)
        weight = initial_router(width, num_adapters, init_std, generator)
        routers.append(TokenRouter(weight, torch.zeros(num_adapters), top_k, g, renormalize))
    return routers.to(next(model.parameters()).device)


def compose_moe(
    model: nn.Module,
    adapters: list[LoraAdapter],
    *,
    granularity: Granularity = "module",
    top_k: int | None = None,
    renormalize: bool = False,
    seed: int = 0,
    init_std: float = 0.01,
    dropout: float = 0.0,
    allow_base_mismatch: bool = False,
) -> MoeComposition:
    """Wrap every module any adapter adapts in a ``GatedLoraLinear`` with its router; mutate ``model``.

    The base model is frozen here; only the routers (float32) are trainable. ``top_k=None`` is soft
    gating; ``top_k=k`` keeps k adapters per token (``lorasoup.moe.layer.route``).
    """
    _check_request(model, adapters, granularity, top_k, renormalize)
    check_compatibility(
        adapters, allow_base_mismatch=allow_base_mismatch, mismatch_hint="allow_base_mismatch=True"
    ).raise_if_incompatible()
    plan = plan_sites(model, adapters, sorted({p for a in adapters for p in a.modules}))
    group_names = _groups(plan, granularity)
    routers = _build_routers(
        model,
        plan,
        group_names,
        len(adapters),
        granularity,
        top_k=top_k,
        renormalize=renormalize,
        init_std=init_std,
        seed=seed,
    )
    reference = next(model.parameters())
    device, dtype = reference.device, reference.dtype
    model.requires_grad_(False)
    sites = []
    for path, base in plan:
        A, B, owner, ranks, scales = concat_site(adapters, path, device, dtype)
        group = group_names.index(path if granularity == "module" else block_path(path))
        scale_tensor = torch.tensor(scales, device=device)
        layer = GatedLoraLinear(
            base, A, B, owner, scale_tensor, routers[group], shared=granularity == "layer", dropout=dropout
        )
        replace_module(model, path, layer)
        sites.append(CatSite(path=path, group=group, ranks=ranks, scales=scales))
    model.add_module(ROUTERS_ATTR, routers)
    hooks = []
    if granularity == "layer":
        for name, router in zip(group_names, routers, strict=True):
            before, after = _gate_block(router)
            block = model.get_submodule(name)
            hooks.append(block.register_forward_pre_hook(before, with_kwargs=True))
            hooks.append(block.register_forward_hook(after, with_kwargs=True))
    return MoeComposition(
        model=model,
        routers=routers,
        adapters=list(adapters),
        group_names=group_names,
        sites=sites,
        granularity=granularity,
        top_k=top_k,
        renormalize=renormalize,
        dropout=dropout,
        hooks=hooks,
    )


def remove_moe(composition: MoeComposition) -> nn.Module:
    """Put the original base modules back and drop the routers and hooks: the frozen base again."""
    model = composition.model
    for handle in composition.hooks:
        handle.remove()
    composition.hooks.clear()
    for path, layer in composition.layers().items():
        replace_module(model, path, layer.base)
    if hasattr(model, ROUTERS_ATTR):
        delattr(model, ROUTERS_ATTR)
    return model
