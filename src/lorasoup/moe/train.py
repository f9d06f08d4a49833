"""Train the routers, and only them, on ``L = L_lm + α · L_balance`` with accelerate.

``L_lm`` is the causal-LM loss on the batch's labels; ``L_balance`` is the Switch Transformer
load-balancing loss (``lorasoup.moe.layer.load_balancing_loss``) averaged over the router calls of
the forward pass, counting real tokens only. The loop is CAT's (``lorasoup.training.loop``): AdamW,
linear warm-up then decay, a data order that is a function of (seed, epoch) alone, and small
checkpoints (the routers, optimizer, scheduler, step, RNG state) from which a resumed run ends
exactly where the uninterrupted one does.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset

from lorasoup.errors import LorasoupError
from lorasoup.moe.inject import MoeComposition
from lorasoup.options import FitOptions
from lorasoup.training import loop as fit_loop
from lorasoup.training.loop import Checkpoints, Collate, FitResult, ProgressHook

CHECKPOINT_FILE = "moe_state.pt"


@dataclass
class MoeFitResult(FitResult):
    """CAT's fit result plus the two parts of the loss per optimizer step."""

    lm_losses: list[float] = field(default_factory=list)
    balance_losses: list[float] = field(default_factory=list)


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    fit_loop.save_checkpoint(path, state, file=CHECKPOINT_FILE)


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    return fit_loop.load_checkpoint(path, file=CHECKPOINT_FILE, kind="MoE")


def _restore(composition: MoeComposition, loop: fit_loop.Loop, resume_from: str | Path) -> int:
    state = load_checkpoint(resume_from)
    if state.get("groups") != composition.group_names:
        raise LorasoupError(f"{resume_from}: the checkpoint's routers belong to another composition")
    composition.routers.load_state_dict(state["routers"])
    return loop.restore(state)


def _state(composition: MoeComposition, loop: fit_loop.Loop, step: int) -> dict[str, Any]:
    return {
        "groups": composition.group_names,
        "routers": {k: v.detach().cpu() for k, v in composition.routers.state_dict().items()},
        **loop.state(step),
    }


def _losses(
    composition: MoeComposition, model: Any, batch: dict[str, torch.Tensor], balance_coef: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(L, L_lm, L_balance)`` of one micro-batch, with ``L = L_lm + α · L_balance``."""
    with composition.recording() as records:
        lm_loss = fit_loop.language_model_loss(model, batch)
    balance = composition.balance_loss(records, batch.get("attention_mask"))
    return lm_loss + balance_coef * balance, lm_loss, balance


def train_routers(
    composition: MoeComposition,
    dataset: Dataset,
    collate: Collate,
    options: FitOptions,
    *,
    balance_coef: float = 0.01,
    checkpoint_dir: Path | None = None,
    resume_from: str | Path | None = None,
    progress: ProgressHook | None = None,
) -> MoeFitResult:
    """Train ``composition.routers`` on ``dataset`` (base model and adapters stay frozen)."""
    loop = fit_loop.prepare_loop(
        composition.model, list(composition.routers.parameters()), dataset, collate, options
    )
    step = 0 if resume_from is None else _restore(composition, loop, resume_from)
    result = MoeFitResult(steps=step, resumed_from_step=step)
    checkpoints = None
    if checkpoint_dir is not None:
        checkpoints = Checkpoints(checkpoint_dir, CHECKPOINT_FILE, lambda at: _state(composition, loop, at))
    start = time.perf_counter()
    result.steps, history, _ = fit_loop.run_loop(
        loop,
        options,
        lambda model, batch: _losses(composition, model, batch, balance_coef),
        step=step,
        checkpoints=checkpoints,
        progress=progress,
    )
    for total, lm, balance in history:
        result.losses.append(total)
        result.lm_losses.append(lm)
        result.balance_losses.append(balance)
    result.seconds = time.perf_counter() - start
    return result
