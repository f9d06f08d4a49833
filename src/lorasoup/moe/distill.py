"""Distill a trained router into static CAT weights: its mean gates per module over a dataset.

For router ``g`` and adapter ``i`` the distilled weight is the token-weighted mean gate over every
real token ``t`` (attention mask 1, prompt and response alike) of the dataset::

    w_{g,i} = Σ_t g_i(h_t) / T

(sums over all batches, then one division: not a mean of batch means). Every module gated by router
``g`` gets ``w_{g,·}`` as its CAT weights (``parameterisation="free"``, so the weights are used as
they are). The distilled model equals the MoE model only where the gates do not vary with the
token; evaluating the distilled adapter measures what the averaging loses. The CAT composition then
folds and exports exactly as any CAT result (``lorasoup.cat.fold``, ``lorasoup.export.peft``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from lorasoup.cat.inject import CatComposition, compose_cat
from lorasoup.errors import DataError
from lorasoup.moe.inject import MoeComposition, remove_moe

CountHook = Callable[[int, int], None]


def mean_gates(
    composition: MoeComposition,
    dataset: Dataset,
    collate: Callable[[list[dict[str, Any]]], dict[str, Tensor]],
    *,
    batch_size: int = 8,
    progress: CountHook | None = None,
) -> tuple[Tensor, int]:
    """Each router's mean gates (module docstring): ``(w (G, K) float32 on the CPU, real tokens)``."""
    model = composition.model
    device = next(model.parameters()).device
    G, K = len(composition.routers), len(composition.adapters)
    sums = torch.zeros(G, K, dtype=torch.float64)
    counts = torch.zeros(G, dtype=torch.float64)
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=collate)
    tokens = 0
    was_training = model.training
    model.eval()
    with torch.no_grad():
        for done, batch in enumerate(loader, 1):
            mask = batch["attention_mask"].to(device)
            with composition.recording() as records:
                model(input_ids=batch["input_ids"].to(device), attention_mask=mask)
            weight = mask.reshape(-1).double()
            for record in records:
                gates = record.gates.reshape(-1, K).double()  # (T, K)
                sums[record.group] += (weight[:, None] * gates).sum(0).cpu()
                counts[record.group] += weight.sum().cpu()
            tokens += int(mask.sum())
            if progress is not None:
                progress(done, len(loader))
    model.train(was_training)
    if bool((counts == 0).any()):
        unused = composition.group_names[int((counts == 0).nonzero()[0])]
        raise DataError(f"router {unused} saw no token of the data; give data with at least one token")
    return (sums / counts[:, None]).float(), tokens


def module_weights(composition: MoeComposition, gates: Tensor) -> dict[str, Tensor]:
    """Each adapted module's CAT weights ``(K,)``: the mean gates ``gates (G, K)`` of its router."""
    return {site.path: gates[site.group].clone() for site in composition.sites}


def distill_to_cat(composition: MoeComposition, gates: Tensor) -> CatComposition:
    """Replace the MoE layers by CAT layers whose weights are the mean gates (``gates (G, K)``).

    Consumes ``composition``: its model becomes a CAT model (``granularity="module"``,
    ``parameterisation="free"``) that folds and exports like any CAT result, or trains further.
    """
    weights = module_weights(composition, gates)
    adapters = composition.adapters
    model = remove_moe(composition)
    # The MoE composition already checked these adapters against each other and against the model.
    cat = compose_cat(
        model, adapters, granularity="module", parameterisation="free", allow_base_mismatch=True
    )
    with torch.no_grad():
        for g, path in enumerate(cat.group_names):
            cat.weights.theta[g] = weights[path].to(cat.weights.theta)
    return cat
