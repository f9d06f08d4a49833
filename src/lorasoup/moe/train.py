"""Train the routers, and only them, on ``L = L_lm + α · L_balance`` with accelerate.

``L_lm`` is the causal-LM loss on the batch's labels; ``L_balance`` is the Switch Transformer
load-balancing loss (``lorasoup.moe.layer.load_balancing_loss``) averaged over the router calls of
the forward pass, counting real tokens only. The loop follows CAT's (``lorasoup.cat.fit``): AdamW,
linear warm-up then decay, a data order that is a function of (seed, epoch) alone, and small
checkpoints (the routers, optimizer, scheduler, step, RNG state) from which a resumed run ends
exactly where the uninterrupted one does.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset

from lorasoup.cat.config import TrainOptions
from lorasoup.cat.fit import EpochShuffle, FitResult, ProgressHook, _linear_warmup_decay
from lorasoup.cat.fit import load_checkpoint as load_state
from lorasoup.cat.fit import save_checkpoint as save_state
from lorasoup.errors import LorasoupError
from lorasoup.moe.inject import MoeComposition

CHECKPOINT_FILE = "moe_state.pt"


@dataclass
class MoeFitResult(FitResult):
    """CAT's fit result plus the two parts of the loss per optimizer step."""

    lm_losses: list[float] = field(default_factory=list)
    balance_losses: list[float] = field(default_factory=list)


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    save_state(path, state, file=CHECKPOINT_FILE)


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    return load_state(path, file=CHECKPOINT_FILE, kind="MoE")


def _restore(composition: MoeComposition, optimizer: Any, scheduler: Any, resume_from: str | Path) -> int:
    state = load_checkpoint(resume_from)
    if state.get("groups") != composition.group_names:
        raise LorasoupError(f"{resume_from}: the checkpoint's routers belong to another composition")
    composition.routers.load_state_dict(state["routers"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["rng"])
    if state.get("cuda_rng") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda_rng"])
    return int(state["step"])


def _state(composition: MoeComposition, optimizer: Any, scheduler: Any, step: int) -> dict[str, Any]:
    return {
        "groups": composition.group_names,
        "routers": {k: v.detach().cpu() for k, v in composition.routers.state_dict().items()},
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "rng": torch.get_rng_state(),
        "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
        "step": step,
    }


@dataclass
class _Loop:
    """What ``accelerate`` prepared for a run, and the run's length."""

    accelerator: Any
    model: Any
    optimizer: Any
    loader: Any
    scheduler: Any
    parameters: list[torch.nn.Parameter]
    steps_per_epoch: int
    total: int


def _prepare(
    composition: MoeComposition,
    dataset: Dataset,
    collate: Callable[[list[dict[str, Any]]], dict[str, torch.Tensor]],
    options: TrainOptions,
) -> _Loop:
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs

    # A and B are frozen buffers: re-broadcasting them every step under DDP would move the whole
    # adapter stack across GPUs for nothing.
    accelerator = Accelerator(
        gradient_accumulation_steps=options.grad_accum,
        kwargs_handlers=[DistributedDataParallelKwargs(broadcast_buffers=False)],
        cpu=options.device == "cpu",
    )
    # Its own generator, so that creating an iterator draws nothing from the global RNG.
    loader = DataLoader(
        dataset,
        batch_size=options.batch_size,
        sampler=EpochShuffle(len(dataset), options.seed),
        collate_fn=collate,
        generator=torch.Generator().manual_seed(options.seed),
    )
    parameters = list(composition.routers.parameters())
    optimizer = torch.optim.AdamW(parameters, lr=options.learning_rate, weight_decay=options.weight_decay)
    model, optimizer, loader = accelerator.prepare(composition.model, optimizer, loader)
    # After prepare: under DDP each process sees its shard, so an epoch is fewer steps per process.
    steps_per_epoch = max(1, math.ceil(len(loader) / options.grad_accum))
    total = options.max_steps or steps_per_epoch * options.epochs
    # Not passed through accelerate, which would advance it once per process per step (as CAT's loop).
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, _linear_warmup_decay(total, int(options.warmup_ratio * total))
    )
    return _Loop(accelerator, model, optimizer, loader, scheduler, parameters, steps_per_epoch, total)


def _losses(
    composition: MoeComposition, model: Any, batch: dict[str, torch.Tensor], balance_coef: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(L, L_lm, L_balance)`` of one micro-batch, with ``L = L_lm + α · L_balance``."""
    with composition.recording() as records:
        lm_loss = model(**batch).loss
    balance = composition.balance_loss(records, batch.get("attention_mask"))
    return lm_loss + balance_coef * balance, lm_loss, balance


def train_routers(
    composition: MoeComposition,
    dataset: Dataset,
    collate: Callable[[list[dict[str, Any]]], dict[str, torch.Tensor]],
    options: TrainOptions,
    *,
    balance_coef: float = 0.01,
    checkpoint_dir: Path | None = None,
    resume_from: str | Path | None = None,
    progress: ProgressHook | None = None,
) -> MoeFitResult:
    """Train ``composition.routers`` on ``dataset`` (base model and adapters stay frozen)."""
    loop = _prepare(composition, dataset, collate, options)
    accelerator, model, optimizer, scheduler = loop.accelerator, loop.model, loop.optimizer, loop.scheduler
    step = 0 if resume_from is None else _restore(composition, optimizer, scheduler, resume_from)
    result = MoeFitResult(steps=step, resumed_from_step=step)
    model.train()
    start = time.perf_counter()
    while step < loop.total:
        epoch, done_in_epoch = divmod(step, loop.steps_per_epoch)
        loop.loader.set_epoch(epoch)
        skip = done_in_epoch * options.grad_accum
        batches = accelerator.skip_first_batches(loop.loader, skip) if skip else loop.loader
        sums, micro = torch.zeros(3, dtype=torch.float64), 0
        for batch in batches:
            with accelerator.accumulate(model):
                losses = _losses(composition, model, batch, balance_coef)
                accelerator.backward(losses[0])
                sums += torch.tensor([value.detach().float().item() for value in losses], dtype=torch.float64)
                micro += 1
                if accelerator.sync_gradients and options.max_grad_norm > 0:
                    accelerator.clip_grad_norm_(loop.parameters, options.max_grad_norm)
                optimizer.step()
                if accelerator.sync_gradients:
                    scheduler.step()
                optimizer.zero_grad(set_to_none=True)
            if not accelerator.sync_gradients:
                continue
            step += 1
            total, lm, balance = (sums / micro).tolist()
            result.losses.append(total)
            result.lm_losses.append(lm)
            result.balance_losses.append(balance)
            sums, micro = torch.zeros(3, dtype=torch.float64), 0
            if progress is not None:
                progress(step, loop.total, total)
            due = checkpoint_dir is not None and options.save_every and step % options.save_every == 0
            if due and accelerator.is_main_process:
                save_checkpoint(
                    checkpoint_dir / f"step-{step}", _state(composition, optimizer, scheduler, step)
                )
            if step >= loop.total:
                break
    model.eval()
    accelerator.wait_for_everyone()
    result.steps, result.seconds = step, time.perf_counter() - start
    return result
