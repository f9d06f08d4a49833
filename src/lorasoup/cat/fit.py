"""Train the CAT weights, and only them, with accelerate (one CPU, one GPU, or several through DDP).

Checkpoints hold just ``θ``, the optimizer and scheduler state, the step and the RNG state: a few
kilobytes. The data order is a function of (seed, epoch), so a resumed run sees exactly the batches
the uninterrupted run would have seen and ends with the same weights.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from lorasoup.cat.config import TrainOptions
from lorasoup.cat.inject import CatComposition
from lorasoup.errors import LorasoupError
from lorasoup.resources import StepClock, synchronizer

CHECKPOINT_FILE = "cat_state.pt"
ProgressHook = Callable[[int, int, float], None]


class EpochShuffle(Sampler[int]):
    """A permutation drawn from ``(seed, epoch)`` alone, so any epoch's order can be recomputed."""

    def __init__(self, size: int, seed: int) -> None:
        self.size, self.seed, self.epoch = size, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        return iter(torch.randperm(self.size, generator=generator).tolist())

    def __len__(self) -> int:
        return self.size


@dataclass
class FitResult:
    steps: int
    losses: list[float] = field(default_factory=list)
    seconds: float = 0.0
    resumed_from_step: int = 0
    throughput: dict[str, Any] = field(default_factory=dict)
    device: str = "cpu"

    @property
    def first_loss(self) -> float | None:
        return self.losses[0] if self.losses else None

    @property
    def last_loss(self) -> float | None:
        return self.losses[-1] if self.losses else None


def _linear_warmup_decay(total: int, warmup: int) -> Callable[[int], float]:
    def factor(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        return max(0.0, (total - step) / max(1, total - warmup))

    return factor


def save_checkpoint(path: Path, state: dict[str, Any], *, file: str = CHECKPOINT_FILE) -> None:
    """Write ``state`` to ``path/file`` through a temporary file (a crash never leaves half of one)."""
    path.mkdir(parents=True, exist_ok=True)
    tmp = path / f".{file}.tmp"
    torch.save(state, tmp)
    os.replace(tmp, path / file)


def load_checkpoint(path: str | Path, *, file: str = CHECKPOINT_FILE, kind: str = "CAT") -> dict[str, Any]:
    """A checkpoint written by :func:`save_checkpoint`: ``path`` is its step directory or the file."""
    path = Path(path)
    target = path / file if path.is_dir() else path
    if not target.is_file():
        raise LorasoupError(
            f"no {kind} checkpoint at {target}; pass a step-N directory from a run's checkpoints"
        )
    try:
        return torch.load(target, map_location="cpu", weights_only=False)
    except Exception as err:
        raise LorasoupError(f"{target}: cannot read the checkpoint ({type(err).__name__})") from None


def fit_cat_weights(
    composition: CatComposition,
    dataset: Dataset,
    collate: Callable[[list[dict[str, Any]]], dict[str, torch.Tensor]],
    options: TrainOptions,
    *,
    checkpoint_dir: Path | None = None,
    resume_from: str | Path | None = None,
    progress: ProgressHook | None = None,
) -> FitResult:
    """Train ``composition.weights`` on ``dataset`` with AdamW and linear warm-up/decay."""
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs

    # A and B are frozen buffers: re-broadcasting them every step under DDP would move the whole
    # adapter stack across GPUs for nothing.
    accelerator = Accelerator(
        gradient_accumulation_steps=options.grad_accum,
        kwargs_handlers=[DistributedDataParallelKwargs(broadcast_buffers=False)],
        cpu=options.device == "cpu",
    )
    sampler = EpochShuffle(len(dataset), options.seed)
    # Its own generator, so that creating an iterator draws nothing from the global RNG: dropout masks
    # then depend only on the RNG state saved in the checkpoint.
    loader = DataLoader(
        dataset,
        batch_size=options.batch_size,
        sampler=sampler,
        collate_fn=collate,
        generator=torch.Generator().manual_seed(options.seed),
    )
    optimizer = torch.optim.AdamW(
        [composition.weights.theta], lr=options.learning_rate, weight_decay=options.weight_decay
    )
    model, optimizer, loader = accelerator.prepare(
        _compiled(composition.model, options.compile), optimizer, loader
    )
    # After prepare: under DDP each process sees its shard, so an epoch is fewer steps per process.
    steps_per_epoch = max(1, math.ceil(len(loader) / options.grad_accum))
    total = options.max_steps or steps_per_epoch * options.epochs
    # Not passed through accelerate: its wrapper advances the schedule once per process per step
    # (it assumes a schedule written for one process), which would run it N times too fast.
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, _linear_warmup_decay(total, int(options.warmup_ratio * total))
    )

    step = 0
    if resume_from is not None:
        state = load_checkpoint(resume_from)
        with torch.no_grad():
            composition.weights.theta.copy_(state["theta"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["rng"])
        if state.get("cuda_rng") is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda_rng"])
        step = int(state["step"])
    result = FitResult(steps=step, resumed_from_step=step)

    model.train()
    start = time.perf_counter()
    clock = StepClock(total, first_step=step, synchronize=synchronizer(accelerator.device))
    clock.start()
    while step < total:
        epoch, done_in_epoch = divmod(step, steps_per_epoch)
        loader.set_epoch(epoch)
        batches = (
            accelerator.skip_first_batches(loader, done_in_epoch * options.grad_accum)
            if done_in_epoch
            else loader
        )
        running, micro = 0.0, 0
        for batch in batches:
            with accelerator.accumulate(model):
                loss = model(**batch).loss
                accelerator.backward(loss)
                running += loss.detach().float().item()
                micro += 1
                if accelerator.sync_gradients and options.max_grad_norm > 0:
                    accelerator.clip_grad_norm_([composition.weights.theta], options.max_grad_norm)
                optimizer.step()
                if accelerator.sync_gradients:
                    scheduler.step()
                optimizer.zero_grad(set_to_none=True)
            if not accelerator.sync_gradients:
                continue
            step += 1
            clock.tick(step)
            result.losses.append(running / micro)
            running, micro = 0.0, 0
            if progress is not None:
                progress(step, total, result.losses[-1])
            due = checkpoint_dir is not None and options.save_every and step % options.save_every == 0
            # Under FSDP2 θ is sharded: every process takes part in gathering it, one saves it.
            theta = composition.weights.full_theta().detach().cpu() if due else None
            if due and accelerator.is_main_process:
                save_checkpoint(
                    checkpoint_dir / f"step-{step}",
                    {
                        "theta": theta,
                        "optimizer": optimizer.state_dict(),
                        "scheduler": scheduler.state_dict(),
                        "rng": torch.get_rng_state(),
                        "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
                        "step": step,
                    },
                )
            if step >= total:
                break
    model.eval()
    accelerator.wait_for_everyone()
    composition.weights.gather_()  # export and run.json read θ on the main process only
    result.steps = step
    result.seconds = time.perf_counter() - start
    result.throughput, result.device = clock.rates(), str(accelerator.device)
    return result


def _compiled(model: torch.nn.Module, mode: str) -> torch.nn.Module:
    """``model`` itself, or a view of it whose repeated blocks (decoder layers) are compiled one by one.

    Regional compilation (accelerate's ``compile_regions``) shares the parameters, buffers and CAT
    weights with ``model``; every layer reuses one graph, because CAT layers index their weights
    through buffers rather than Python ints.
    """
    if mode == "none":
        return model
    from accelerate.utils import compile_regions

    return compile_regions(model, mode=None if mode == "default" else mode)
