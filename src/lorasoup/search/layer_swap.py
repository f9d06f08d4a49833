"""Choose a layer swap by a small search: score an explicit family of rules on a few target examples.

A layer swap (``lorasoup.merging.layer_swap``, Bandarkar et al. 2025, https://arxiv.org/abs/2410.01335)
gives every transformer layer one adapter whole: CAT with per-layer weights fixed to one-hot rows.
Which rule to use is the open choice; this module tries every rule of a small family on the k target
examples and keeps the one of least loss (the mean cross-entropy over the response tokens, the
weight search's objective, ``search.scoring``). The l1 term of the weight search is left out: every
one-hot table has the same ``mean |w| = 1/K``, so it would shift every score alike.

The family, for K adapters and L layers (:func:`swap_candidates`; ``a ≠ b`` every ordered pair):

- ``uniform``: every layer from ``a``. K rules (the adapters alone: the baseline a swap must beat);
- ``blocks``: the lowest n layers from ``a``, the others from ``b``, n = 1 .. L-1. K(K-1)(L-1) rules;
  "the top n from ``a``" is the rule of the pair ``(b, a)`` with L-n;
- ``edges``: the first n and the last n layers from ``a``, the middle from ``b`` (the paper's swap),
  n = 1 .. ⌊(L-1)/2⌋ (n = L/2 would give every layer to ``a``, which is ``uniform``).
  K(K-1)⌊(L-1)/2⌋ rules.

So ``K + K(K-1)(L-1) + K(K-1)⌊(L-1)/2⌋ = O(K²L)`` candidates (:func:`family_size`), every one a
different per-layer assignment: 94 for two adapters on a 32-layer model. Modules outside the
numbered layers take ``other`` if given, else the rule's ``rest`` (as ``LayerSwapRule`` says).

The composition is composed once (CAT, ``granularity="layer"``, ``parameterisation="free"``, as
``compose_layer_swap`` builds it); each candidate is its one-hot table ``w (G, K)`` from
``swap_weights``, and a chunk of candidates is scored in one batched forward through CAT's
population override (``score_population``), which equals setting θ to each table in turn
(``tests/search/test_scoring.py``) without touching θ. Afterwards θ holds the best rule's table, so
the composition is exactly ``compose_layer_swap`` with the chosen rule and folds through CAT's export.
The best is the least loss; equal losses go to the earliest candidate in the family's order (uniform,
blocks, edges; adapters in the given order; smaller n first), so the choice is deterministic.
Non-finite losses are never chosen.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, get_args

import torch

from lorasoup.cat.inject import CatComposition
from lorasoup.errors import ConfigError, DataError
from lorasoup.merging.layer_swap import LayerSwapRule, model_layers, swap_weights
from lorasoup.search.config import SwapFamily as Family
from lorasoup.search.scoring import TargetBatch, forward_split, score_population, target_batches

FAMILIES: tuple[Family, ...] = get_args(Family)
CandidateProgress = Callable[[int, int], None]
"""``(candidates scored, candidates in all)``."""


@dataclass(frozen=True)
class SwapCandidate:
    """One rule of the family and the family it belongs to."""

    family: Family
    rule: LayerSwapRule


def swap_candidates(
    adapter_names: Sequence[str],
    num_layers: int,
    *,
    families: Sequence[Family] = FAMILIES,
    other: str | None = None,
) -> list[SwapCandidate]:
    """The family's rules in their fixed order (see the module docstring); ``other`` goes into each."""
    names = list(adapter_names)
    pairs = [(a, b) for a in names for b in names if a != b]
    candidates: list[SwapCandidate] = []
    for family in FAMILIES:  # the fixed order, whatever order ``families`` lists them in
        if family not in families:
            continue
        if family == "uniform":
            rules = [LayerSwapRule(rest=a, other=other) for a in names]
        elif family == "blocks":
            rules = [
                LayerSwapRule(first=n, edges=a, rest=b, other=other)
                for a, b in pairs
                for n in range(1, num_layers)
            ]
        else:
            rules = [
                LayerSwapRule(first=n, last=n, edges=a, rest=b, other=other)
                for a, b in pairs
                for n in range(1, (num_layers - 1) // 2 + 1)
            ]
        candidates.extend(SwapCandidate(family, rule) for rule in rules)
    return candidates


def family_size(num_adapters: int, num_layers: int, families: Sequence[Family] = FAMILIES) -> int:
    """How many rules :func:`swap_candidates` gives: ``K + K(K-1)(L-1) + K(K-1)⌊(L-1)/2⌋`` in all."""
    k, pairs = num_adapters, num_adapters * (num_adapters - 1)
    sizes = {
        "uniform": k,
        "blocks": pairs * max(num_layers - 1, 0),
        "edges": pairs * max((num_layers - 1) // 2, 0),
    }
    return sum(sizes[f] for f in set(families))


def rule_section(rule: LayerSwapRule) -> dict[str, Any]:
    """The rule as a ``layer_swap:`` section of ``lorasoup merge`` (only the keys it sets)."""
    section: dict[str, Any] = {}
    if rule.first:
        section["first"] = rule.first
    if rule.last:
        section["last"] = rule.last
    if rule.edges is not None:
        section["edges"] = rule.edges
    section["rest"] = rule.rest
    if rule.other is not None:
        section["other"] = rule.other
    return section


def describe_rule(rule: LayerSwapRule, num_layers: int) -> str:
    """Runs of layers and their adapter, e.g. ``0-1 math | 2-5 code | 6-7 math``."""
    runs: list[tuple[int, int, str]] = []
    for layer in range(num_layers):
        name = rule.adapter_for(layer, num_layers)
        if runs and runs[-1][2] == name:
            runs[-1] = (runs[-1][0], layer, name)
        else:
            runs.append((layer, layer, name))
    return " | ".join(f"{lo}-{hi} {name}" if hi > lo else f"{lo} {name}" for lo, hi, name in runs)


@dataclass
class LayerSwapSearchResult:
    """Every candidate's loss and the chosen one: ``losses (P,)`` float32 (``inf`` where non-finite)."""

    candidates: list[SwapCandidate]
    losses: torch.Tensor
    best: int
    num_layers: int
    weights: torch.Tensor  # (G, K) the chosen rule's one-hot table, as θ now holds it
    seconds: float

    @property
    def rule(self) -> LayerSwapRule:
        return self.candidates[self.best].rule

    @property
    def loss(self) -> float:
        return float(self.losses[self.best])

    def ranking(self) -> list[int]:
        """Candidate indices from best to worst (ties in the family's order)."""
        return sorted(range(len(self.candidates)), key=lambda i: (float(self.losses[i]), i))

    def table(self) -> list[dict[str, Any]]:
        """One row per candidate, in the family's order: family, rule (a ``layer_swap:`` section),
        layers (runs), loss (``None`` where non-finite)."""
        return [
            {
                "family": c.family,
                "rule": rule_section(c.rule),
                "layers": describe_rule(c.rule, self.num_layers),
                "loss": float(loss) if math.isfinite(float(loss)) else None,
            }
            for c, loss in zip(self.candidates, self.losses, strict=True)
        ]


def _check_search(composition: CatComposition, families: Sequence[Family], other: str | None) -> list[str]:
    """The adapter names, once the composition, ``families`` and ``other`` are fit for a search."""
    if composition.granularity != "layer" or composition.weights.parameterisation != "free":
        raise ValueError(
            "a layer-swap search needs CAT composed with granularity='layer' and parameterisation='free', "
            f"got {composition.granularity!r} and {composition.weights.parameterisation!r}"
        )
    names = list(composition.adapter_names)
    if len(names) < 2:
        raise ConfigError(f"a layer swap chooses between adapters: give at least two, got {len(names)}")
    unknown = sorted(set(families) - set(FAMILIES))
    if unknown or not families:
        raise ConfigError(f"layer_swap.families: choose from {', '.join(FAMILIES)}, got {list(families)}")
    if other is not None and other not in names:
        raise ConfigError(f"layer_swap.other names adapter {other!r}; the adapters are {', '.join(names)}")
    return names


def _score_candidates(
    composition: CatComposition,
    batches: Sequence[TargetBatch],
    weights: torch.Tensor,
    chunk: int,
    progress: CandidateProgress | None,
) -> tuple[torch.Tensor, float]:
    """Every candidate's loss ``(P,)``, ``chunk`` tables ``weights (P, G, K)`` per forward, in eval mode
    (the model's mode restored after); and the seconds it took."""
    losses = torch.empty(len(weights))
    was_training = composition.model.training
    composition.model.eval()
    start = time.perf_counter()
    try:
        for first in range(0, len(weights), chunk):
            group = weights[first : first + chunk]  # (m, G, K)
            losses[first : first + len(group)] = score_population(
                composition, batches, group, candidates_per_forward=chunk
            )
            if progress is not None:
                progress(first + len(group), len(weights))
    finally:
        composition.model.train(was_training)
    return losses, time.perf_counter() - start


def _best_candidate(losses: torch.Tensor) -> tuple[torch.Tensor, int]:
    """``losses`` with non-finite ones as ``inf``, and the least one's index (the earliest among equals)."""
    losses = torch.where(torch.isfinite(losses), losses, torch.full_like(losses, math.inf))
    if not torch.isfinite(losses).any():
        raise DataError("every layer-swap candidate's loss is non-finite; check the adapters and data.train")
    return losses, min(range(len(losses)), key=lambda i: (float(losses[i]), i))


def search_layer_swap(
    composition: CatComposition,
    examples: Sequence[Mapping[str, list[int]]],
    *,
    pad_token_id: int,
    families: Sequence[Family] = FAMILIES,
    other: str | None = None,
    num_layers: int | None = None,
    rows_per_forward: int | None = None,
    candidates_per_forward: int = 16,
    progress: CandidateProgress | None = None,
) -> LayerSwapSearchResult:
    """Score every rule of the family on ``examples`` and leave θ at the best rule's one-hot table.

    ``composition``: CAT with ``granularity="layer"`` and ``parameterisation="free"`` (e.g.
    ``compose_cat(model, adapters, granularity="layer", parameterisation="free")``). ``examples``:
    tokenised records (``input_ids``, ``attention_mask``, ``labels``), as ``search_weights`` takes.
    ``num_layers``: default the model's (``config.num_hidden_layers``), else what the adapted paths
    imply. One forward holds ``candidates_per_forward`` candidates × all examples, or at most
    ``rows_per_forward`` rows (candidates × examples). The model's train/eval mode is restored.
    """
    names = _check_search(composition, families, other)
    rows = [examples[i] for i in range(len(examples))]
    if not rows:
        raise DataError("the layer-swap search needs at least one target example; check data.train")
    layers = num_layers or model_layers(composition.model, [site.path for site in composition.sites])
    candidates = swap_candidates(names, layers, families=families, other=other)
    weights = torch.stack(
        [swap_weights(c.rule, names, composition.group_names, layers) for c in candidates]
    )  # (P, G, K) one-hot rows

    per_batch, chunk = forward_split(len(rows), candidates_per_forward, rows_per_forward)
    batches = target_batches(
        rows, pad_token_id=pad_token_id, device=composition.weights.theta.device, examples_per_batch=per_batch
    )
    losses, seconds = _score_candidates(composition, batches, weights, chunk, progress)
    losses, best = _best_candidate(losses)
    composition.set_effective_weights(weights[best], initial=True)
    return LayerSwapSearchResult(candidates, losses, best, layers, weights[best].clone(), seconds)
