"""Layer swapping: every transformer layer takes one adapter whole.

Bandarkar et al., "Layer Swapping for Zero-Shot Cross-Lingual Transfer in Large Language Models",
ICLR 2025, https://arxiv.org/abs/2410.01335: the top and bottom layers of one expert are swapped into
another (there, a language expert's outer layers into a math expert). For LoRA adapters, layer ``l``
gets the update of its chosen adapter ``k(l)`` and nothing of the others::

    ΔW_m = s_k B_k A_k    for every module m of layer l, k = k(l)

which is CAT (``lorasoup.cat``) with per-layer weights fixed to one-hot rows: ``w_{l,i} = 1[i = k(l)]``
(``granularity="layer"``, ``parameterisation="free"``). So a swap is composed as a CAT model
(:func:`compose_layer_swap`) and exported through CAT's exact fold (``lorasoup.cat.fold``); the
model-free :func:`layer_swap_factors` is the same fold with the zero rank rows (the other adapters')
dropped. Where the chosen adapter does not adapt a module of its layer, that module gets no update.

Which adapter a layer takes is a :class:`LayerSwapRule`: an explicit list (one adapter per layer), or
``first`` and ``last`` layers from one adapter and the rest from another, e.g.
``{first: 2, last: 2, from: math, rest: code}``. Modules outside numbered layers take ``other``
(default: ``rest``).

The rule can also be chosen by a small search: ``lorasoup search --layer-swap``
(``lorasoup.search.layer_swap``) scores every rule of an explicit ``O(K²L)`` family (one adapter
everywhere; the lowest n layers from one adapter and the rest from another; the first and last n
from one and the middle from another) on a few target examples, through one CAT composition with
each candidate's one-hot rows, and exports the best as this module's fold. It lives in ``search/``,
one layer up, because it scores with the search's objective (``search.scoring``).

``lorasoup merge --method layer_swap`` runs it from a config's ``layer_swap:`` section: the method
``layer_swap`` (registered here, space ``"layer"``) gets each module's one-hot row from
:func:`module_swap_weights` times the adapters' ``weight`` (default 1), and folds the chosen adapter
as CAT's export does (``A' = w_k s_k A_k``, ``B' = B_k``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any

import torch
from torch import Tensor, nn

from lorasoup.adapters import LoraAdapter, LoraFactors
from lorasoup.cat.fold import fold_factors
from lorasoup.cat.inject import CatComposition, compose_cat, group_name
from lorasoup.errors import ConfigError
from lorasoup.export.serving import pad_factors
from lorasoup.merging.base import MergeMethod, MergeParams, ModuleMerge, present, register

LAYER_SWAP = "Layer swapping, Bandarkar et al. ICLR 2025, https://arxiv.org/abs/2410.01335"


@dataclass(frozen=True)
class LayerSwapRule:
    """Which adapter (by name) each transformer layer takes.

    ``layers``: one adapter name per layer, in order (then ``first``/``last``/``edges`` are unused).
    Otherwise the ``first`` and ``last`` layers take ``edges`` (YAML key ``from``) and the others
    ``rest``. ``other``: modules not inside a numbered layer (default ``rest``).
    """

    rest: str | None = None
    edges: str | None = None
    first: int = 0
    last: int = 0
    layers: tuple[str, ...] | None = None
    other: str | None = None

    @classmethod
    def from_mapping(cls, mapping: Mapping[str, Any]) -> LayerSwapRule:
        """From a config mapping; ``from`` is accepted for ``edges``, unknown keys are errors."""
        values = dict(mapping)
        if "from" in values:
            if "edges" in values:
                raise ConfigError("layer swap: give 'from' or 'edges', not both (they are the same)")
            values["edges"] = values.pop("from")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(
                f"layer swap: unknown key(s) {', '.join(unknown)}; use {', '.join(sorted(known | {'from'}))}"
            )
        if values.get("layers") is not None:
            if not isinstance(values["layers"], (list, tuple)):
                raise ConfigError("layer swap: 'layers' must be a list of adapter names, one per layer")
            values["layers"] = tuple(values["layers"])
        return cls(**values)

    def validate(self, adapter_names: Sequence[str], num_layers: int) -> None:
        """Every name is an adapter's, and the rule covers exactly ``num_layers`` layers."""
        if self.layers is not None:
            if len(self.layers) != num_layers:
                raise ConfigError(
                    f"layer swap: 'layers' names {len(self.layers)} adapters but the model has "
                    f"{num_layers} layers; give one adapter name per layer"
                )
            named = {"layers": list(self.layers), "other": [self.other]}
        else:
            if self.first < 0 or self.last < 0 or self.first + self.last > num_layers:
                raise ConfigError(
                    f"layer swap: first={self.first} and last={self.last} must be >= 0 and together at "
                    f"most the {num_layers} layers"
                )
            if self.rest is None or (self.edges is None and self.first + self.last > 0):
                raise ConfigError(
                    "layer swap: give 'rest' (the adapter of the middle layers) and 'from' (the adapter "
                    "of the first and last layers), or 'layers' with one adapter per layer"
                )
            named = {"from": [self.edges], "rest": [self.rest], "other": [self.other]}
        for key, names in named.items():
            for name in names:
                if name is not None and name not in adapter_names:
                    raise ConfigError(
                        f"layer swap: {key} names adapter {name!r}; the adapters are "
                        f"{', '.join(adapter_names)}"
                    )

    def adapter_for(self, layer: int | None, num_layers: int) -> str:
        """The adapter name of layer ``layer`` (``None``: a module outside the numbered layers)."""
        if layer is None:
            chosen = self.other or self.rest
            if chosen is None:
                raise ConfigError("layer swap: some modules are outside numbered layers; set 'other'")
            return chosen
        if self.layers is not None:
            return self.layers[layer]
        if layer < self.first or layer >= num_layers - self.last:
            return self.edges  # type: ignore[return-value]  (validate() checked it is set)
        return self.rest  # type: ignore[return-value]


def layer_index(path: str) -> int | None:
    """``model.layers.3.mlp.up_proj`` → 3; ``None`` for a module outside numbered layers."""
    group = group_name(path, "layer")
    return int(group.split(".", 1)[1]) if group.startswith("layer.") else None


def count_layers(paths: Sequence[str]) -> int:
    """The number of layers the adapted modules imply (the largest layer index + 1)."""
    indices = [i for i in map(layer_index, paths) if i is not None]
    return max(indices) + 1 if indices else 0


def model_layers(model: nn.Module, paths: Sequence[str]) -> int:
    """``config.num_hidden_layers`` (``n_layer`` for GPT-2), else what the adapted paths imply."""
    config = getattr(model, "config", None)
    for key in ("num_hidden_layers", "n_layer"):
        value = getattr(config, key, None)
        if isinstance(value, int):
            return value
    return count_layers(paths)


def swap_weights(
    rule: LayerSwapRule, adapter_names: Sequence[str], group_names: Sequence[str], num_layers: int
) -> Tensor:
    """One-hot CAT weights ``w (G, K)`` for CAT's per-layer groups (``layer.N`` or ``other``)."""
    rule.validate(adapter_names, num_layers)
    w = torch.zeros(len(group_names), len(adapter_names))
    for g, group in enumerate(group_names):
        layer = int(group.split(".", 1)[1]) if group.startswith("layer.") else None
        w[g, list(adapter_names).index(rule.adapter_for(layer, num_layers))] = 1.0
    return w


def compose_layer_swap(
    model: nn.Module, adapters: list[LoraAdapter], rule: LayerSwapRule, *, allow_base_mismatch: bool = False
) -> CatComposition:
    """A CAT model whose per-layer weights are the rule's one-hot rows (mutates ``model``, as
    ``compose_cat``). Fold and export it as any CAT result (``lorasoup.cat.fold.fold_composition``)."""
    paths = sorted({p for a in adapters for p in a.modules})
    num_layers = model_layers(model, paths)
    composition = compose_cat(
        model, adapters, granularity="layer", parameterisation="free", allow_base_mismatch=allow_base_mismatch
    )
    weights = swap_weights(rule, composition.adapter_names, composition.group_names, num_layers)
    composition.set_effective_weights(weights, initial=True)
    return composition


def layer_swap_factors(
    adapters: Sequence[LoraAdapter], rule: LayerSwapRule, *, num_layers: int | None = None
) -> dict[str, LoraFactors]:
    """Each module's exported factors (``A (r, in)``, ``B (out, r)``) at scale 1, float32, all padded to one
    rank, as CAT's ``fold_composition`` gives them.

    CAT's fold (``A' = diag(c) A``) with the one-hot weights, keeping only the chosen adapter's rank
    rows (the others' are zero): ``A = s_k A_k``, ``B = B_k``. A module its layer's adapter does not
    adapt gets a zero rank-1 update. ``num_layers`` defaults to what the adapted paths imply; pass
    the model's when the adapters skip its last layers.
    """
    names = [a.name for a in adapters]
    paths = sorted({p for a in adapters for p in a.modules})
    layers = count_layers(paths) if num_layers is None else num_layers
    rule.validate(names, layers)
    folded: dict[str, LoraFactors] = {}
    for path in paths:
        chosen = adapters[names.index(rule.adapter_for(layer_index(path), layers))].modules.get(path)
        if chosen is None:
            some = next(a.modules[path] for a in adapters if path in a.modules)
            zero_A = torch.zeros(1, some.in_features, device=some.A.device)
            zero_B = torch.zeros(some.out_features, 1, device=some.A.device)
            folded[path] = LoraFactors(zero_A, zero_B, 1.0)
            continue
        coefficients = torch.full((chosen.rank,), chosen.scale)  # one-hot weight 1 times s_k
        folded[path] = LoraFactors(*fold_factors(chosen.A.float(), chosen.B.float(), coefficients), 1.0)
    rank = max(f.rank for f in folded.values())
    return {path: pad_factors(f, rank) for path, f in folded.items()}


def module_swap_weights(
    rule: LayerSwapRule, adapter_names: Sequence[str], paths: Sequence[str], num_layers: int | None = None
) -> dict[str, list[float]]:
    """Each module's one-hot row over the adapters: 1 for its layer's adapter, 0 for the others.

    ``num_layers`` defaults to what ``paths`` imply (:func:`count_layers`)."""
    layers = count_layers(paths) if num_layers is None else num_layers
    rule.validate(adapter_names, layers)
    names = list(adapter_names)
    rows = {}
    for path in paths:
        row = [0.0] * len(names)
        row[names.index(rule.adapter_for(layer_index(path), layers))] = 1.0
        rows[path] = row
    return rows


def merge_swapped(
    factors: Sequence[LoraFactors | None], weights: Tensor, params: MergeParams, generator: torch.Generator
) -> ModuleMerge:
    """One module of a layer swap: ``weights (K,)`` has one non-zero entry ``w_k`` (the module's one-hot
    row times the adapter's weight); the result is CAT's fold of that adapter alone, ``A' = w_k s_k A_k``,
    ``B' = B_k``. A module its adapter does not adapt gets a zero rank-1 update."""
    chosen = [(f, float(w)) for f, w in zip(factors, weights, strict=True) if float(w) != 0.0]
    if len(chosen) > 1:
        raise ValueError(f"a layer swap takes one adapter per module, got {len(chosen)} non-zero weights")
    kept, _ = present(factors, weights)
    if not chosen or chosen[0][0] is None:
        some = kept[0]
        return ModuleMerge(
            A=some.A.new_zeros(1, some.in_features).float(), B=some.B.new_zeros(some.out_features, 1).float()
        )
    f, w = chosen[0]
    A, B = fold_factors(f.A.float(), f.B.float(), torch.full((f.rank,), w * f.scale))
    return ModuleMerge(A=A, B=B)


register(
    MergeMethod(
        name="layer_swap",
        merge=merge_swapped,
        space="layer",
        summary="each layer takes one adapter whole (CAT with one-hot per-layer weights; the rule in the "
        "config's `layer_swap:` section)",
        reference=LAYER_SWAP,
    )
)
