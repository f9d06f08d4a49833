"""LoRA-Flow: a per-layer fusion gate gives the K frozen LoRAs token-level weights; then distilled to CAT.

Wang et al., "LoRA-Flow: Dynamic LoRA Fusion for Large Language Models in Generative Tasks", ACL 2024,
https://arxiv.org/abs/2402.11455. Layer ``l`` has a gate ``W_l (K, d)``, ``b_l (K,)`` reading the
layer's input hidden state ``h_t`` (the residual stream entering the block) at every token ``t``::

    w_{l,t} = softmax(W_l h_t + b_l)                         (K,)
    y = W0 x + Σ_i w_{l,t,i} · s_i · B_i A_i x              every adapted module of layer l

The gates (``K·(d+1)`` parameters per layer) train on the LM loss of a few hundred target examples
with the LoRAs and the base frozen. (We read the bias inside the softmax; the paper's code may add it
outside.) That is exactly ``lorasoup.moe``'s soft router at block granularity, so LoRA-Flow is a preset
of it, not a copy: composition ``compose_moe(granularity="layer", top_k=None)``, training
``train_routers`` without the balancing term (LoRA-Flow has none), and, for an exact PEFT export,
MoE → CAT distillation (``lorasoup.moe.distill``): each layer's mean gate over the real tokens of a
dataset becomes that layer's static CAT weights. Where a gate does not vary with the token (``W_l = 0``)
the distilled CAT model is the LoRA-Flow model exactly; otherwise evaluating it measures what the
averaging loses.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset

from lorasoup.adapters import LoraAdapter
from lorasoup.cat.inject import CatComposition
from lorasoup.errors import ConfigError
from lorasoup.moe.distill import CountHook, distill_to_cat, mean_gates
from lorasoup.moe.inject import MoeComposition, compose_moe
from lorasoup.moe.train import MoeFitResult, train_routers
from lorasoup.options import FitOptions
from lorasoup.training.loop import ProgressHook

LORA_FLOW = "LoRA-Flow, Wang et al. ACL 2024, https://arxiv.org/abs/2402.11455"

Collate = Callable[[list[dict[str, Any]]], dict[str, torch.Tensor]]


def compose_flow(
    model: nn.Module,
    adapters: list[LoraAdapter],
    *,
    seed: int = 0,
    init_std: float = 0.01,
    allow_base_mismatch: bool = False,
) -> MoeComposition:
    """One fusion gate per transformer layer, reading the layer's input hidden state (mutates ``model``).

    ``W_l ~ N(0, init_std²)`` from a generator seeded with ``seed``, ``b_l = 0``: the gates start near
    the uniform ``1/K``.
    """
    return compose_moe(
        model,
        adapters,
        granularity="layer",
        top_k=None,
        seed=seed,
        init_std=init_std,
        allow_base_mismatch=allow_base_mismatch,
    )


def check_flow(composition: MoeComposition) -> None:
    """A LoRA-Flow composition has soft gates read from each layer's input."""
    if composition.granularity != "layer" or composition.top_k is not None:
        raise ConfigError(
            f"LoRA-Flow gates are soft and per layer; this composition has granularity "
            f"{composition.granularity!r} and top_k={composition.top_k}: compose it with compose_flow"
        )


def train_flow_gates(
    composition: MoeComposition,
    dataset: Dataset,
    collate: Collate,
    options: FitOptions,
    *,
    checkpoint_dir: Path | None = None,
    resume_from: str | Path | None = None,
    progress: ProgressHook | None = None,
) -> MoeFitResult:
    """Train the gates, and only them, on the LM loss of ``dataset`` (moe's loop, no balancing term)."""
    check_flow(composition)
    return train_routers(
        composition,
        dataset,
        collate,
        options,
        balance_coef=0.0,
        checkpoint_dir=checkpoint_dir,
        resume_from=resume_from,
        progress=progress,
    )


def distill_flow(
    composition: MoeComposition,
    dataset: Dataset,
    collate: Collate,
    *,
    batch_size: int = 8,
    progress: CountHook | None = None,
) -> tuple[CatComposition, torch.Tensor]:
    """Static CAT weights from the gates: each layer's mean gate over the real tokens of ``dataset``.

    Consumes ``composition`` (its model becomes a CAT model, ``parameterisation="free"``); returns it
    with the mean gates ``(L, K)``. Fold and export it as any CAT result (``lorasoup.cat.fold``).
    """
    check_flow(composition)
    gates, _ = mean_gates(composition, dataset, collate, batch_size=batch_size, progress=progress)
    return distill_to_cat(composition, gates), gates
