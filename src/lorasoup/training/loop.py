"""The fit loop shared by every method that trains a few weights on a frozen model with accelerate:
CAT's weights (``lorasoup.cat.fit``) and the MoE baseline's routers (``lorasoup.moe.train``).

AdamW on the given parameters, linear warm-up then linear decay, gradient accumulation and clipping,
one CPU, one GPU or several through DDP. The data order is a function of (seed, epoch) alone
(:class:`EpochShuffle`) and checkpoints hold only what the method says (its weights, the optimizer and
scheduler state, the step and the RNG state), so a resumed run sees exactly the batches the
uninterrupted run would have seen and ends with the same weights.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from lorasoup.artifacts import atomic_file
from lorasoup.devices import restore_rng_state, rng_state
from lorasoup.errors import LorasoupError
from lorasoup.options import FitOptions
from lorasoup.resources import StepClock, synchronizer

ProgressHook = Callable[[int, int, float], None]
"""``(optimizer step, total steps, loss)`` after every optimizer step."""
Collate = Callable[[list[dict[str, Any]]], dict[str, torch.Tensor]]


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


def warmup_steps(warmup: int | float, total: int) -> int:
    """``warmup`` as a step count: an int is one already, a float is a fraction of ``total``."""
    return int(warmup * total) if isinstance(warmup, float) else warmup


def linear_warmup_decay(total: int, warmup: int) -> Callable[[int], float]:
    """The learning-rate factor of step ``s``: ``(s+1)/warmup`` while warming up, then linear to 0."""

    def factor(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        return max(0.0, (total - step) / max(1, total - warmup))

    return factor


def save_checkpoint(path: Path, state: dict[str, Any], *, file: str) -> None:
    """Write ``state`` to ``path/file`` atomically (a crash never leaves half of one)."""
    with atomic_file(path / file) as tmp:
        torch.save(state, tmp)


def load_checkpoint(path: str | Path, *, file: str, kind: str) -> dict[str, Any]:
    """A checkpoint written by :func:`save_checkpoint`: ``path`` is its step directory or the file;
    ``kind`` names the method in the error ("CAT", "MoE")."""
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


def compiled(model: torch.nn.Module, mode: str) -> torch.nn.Module:
    """``model`` itself, or a view of it whose repeated blocks (decoder layers) are compiled one by one.

    Regional compilation (accelerate's ``compile_regions``) shares the parameters and buffers with
    ``model``; every layer reuses one graph when layers index their weights through buffers.
    """
    if mode == "none":
        return model
    from accelerate.utils import compile_regions

    return compile_regions(model, mode=None if mode == "default" else mode)


def language_model_loss(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The causal LM loss of ``batch`` (its ``labels``), with no KV cache: a transformers model left at
    ``use_cache=True`` builds one in every training forward (bookkeeping for nothing: its tensors are
    the keys and values attention saves for the backward anyway) and, compiled, guards each layer on
    it. Under CUDA graphs that cache is the likeliest cause of the failure ``inputs_require_grad``
    tells: it holds the earlier layers' graph outputs, which Dynamo reads when it compiles a layer."""
    return model(**batch, use_cache=False).loss


def inputs_require_grad(model: torch.nn.Module) -> torch.utils.hooks.RemovableHandle | None:
    """Make the input embeddings' output require grad (a forward hook; its handle, or None where the
    model has no input embeddings), so every decoder layer receives an input that requires grad.

    For CUDA-graph training (``reduce-overhead``). On an H100, ``lorasoup cat`` failed reading "a tensor
    output of CUDAGraphs that has been overwritten by a subsequent run" (``bench/user_path.py``,
    session 13) where the benchmark's CAT step ran, whose inputs require grad (and whose model has no
    KV cache: :func:`language_model_loss`); with a frozen embedding the first layer's input is the only
    one without grad, and Dynamo compiles that layer a second graph (a ``requires_grad`` guard, seen on
    the CPU). This makes the run the benchmark's; the cost is the first layer's input gradient, one
    layer's share of the backward's input GEMMs."""
    getter = getattr(model, "get_input_embeddings", None)
    embeddings = getter() if callable(getter) else None
    if not isinstance(embeddings, torch.nn.Module):
        return None

    def requires_grad(module: torch.nn.Module, inputs: Any, output: torch.Tensor) -> None:
        if torch.is_grad_enabled() and not output.requires_grad:
            output.requires_grad_(True)

    return embeddings.register_forward_hook(requires_grad)


@dataclass
class Loop:
    """What ``accelerate`` prepared for a run, and the run's length."""

    accelerator: Any
    model: Any
    optimizer: Any
    loader: Any
    scheduler: Any
    parameters: list[torch.nn.Parameter]
    steps_per_epoch: int
    total: int
    # reduce-overhead: each step starts a new CUDA-graph iteration, and this hook (inputs_require_grad)
    # is removed when the loop ends
    cuda_graphs: bool = False
    input_grad_hook: torch.utils.hooks.RemovableHandle | None = None

    def state(self, step: int) -> dict[str, Any]:
        """The optimizer, scheduler, step and RNG part of a checkpoint."""
        return {
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            **rng_state(),
            "step": step,
        }

    def restore(self, state: dict[str, Any]) -> int:
        """Undo :meth:`state`; the step to continue from."""
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        restore_rng_state(state)
        return int(state["step"])


def prepare_loop(
    model: torch.nn.Module,
    parameters: list[torch.nn.Parameter],
    dataset: Dataset,
    collate: Collate,
    options: FitOptions,
    *,
    compile_mode: str = "none",
) -> Loop:
    """Accelerator, data loader, AdamW on ``parameters`` and the warm-up/decay schedule, prepared;
    ``compile_mode`` other than ``none`` compiles ``model``'s decoder layers one by one (:func:`compiled`)."""
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs

    # A and B are frozen buffers: re-broadcasting them every step under DDP would move the whole
    # adapter stack across GPUs for nothing.
    accelerator = Accelerator(
        gradient_accumulation_steps=options.grad_accum,
        kwargs_handlers=[DistributedDataParallelKwargs(broadcast_buffers=False)],
        cpu=options.device == "cpu",
    )
    # Its own generator, so that creating an iterator draws nothing from the global RNG: dropout masks
    # then depend only on the RNG state saved in the checkpoint.
    loader = DataLoader(
        dataset,
        batch_size=options.batch_size,
        sampler=EpochShuffle(len(dataset), options.seed),
        collate_fn=collate,
        generator=torch.Generator().manual_seed(options.seed),
    )
    optimizer = torch.optim.AdamW(parameters, lr=options.learning_rate, weight_decay=options.weight_decay)
    cuda_graphs = compile_mode == "reduce-overhead"
    hook = inputs_require_grad(model) if cuda_graphs else None
    model, optimizer, loader = accelerator.prepare(compiled(model, compile_mode), optimizer, loader)
    # After prepare: under DDP each process sees its shard, so an epoch is fewer steps per process.
    steps_per_epoch = max(1, math.ceil(len(loader) / options.grad_accum))
    total = options.max_steps or steps_per_epoch * options.epochs
    # Not passed through accelerate: its wrapper advances the schedule once per process per step
    # (it assumes a schedule written for one process), which would run it N times too fast.
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, linear_warmup_decay(total, warmup_steps(options.warmup, total))
    )
    return Loop(
        accelerator,
        model,
        optimizer,
        loader,
        scheduler,
        parameters,
        steps_per_epoch,
        total,
        cuda_graphs,
        hook,
    )


@dataclass
class Checkpoints:
    """Where and what to save every ``save_steps``: ``state(step)`` runs on every process (a sharded
    weight is gathered by all of them), the main process writes ``directory/step-N/file``."""

    directory: Path
    file: str
    state: Callable[[int], dict[str, Any]]


def run_loop(
    loop: Loop,
    options: FitOptions,
    losses: Callable[[Any, dict[str, torch.Tensor]], Sequence[torch.Tensor]],
    *,
    step: int = 0,
    checkpoints: Checkpoints | None = None,
    progress: ProgressHook | None = None,
) -> tuple[int, list[list[float]], StepClock]:
    """Optimise from ``step`` to ``loop.total``; ``losses(model, batch)`` gives a micro-batch's losses,
    the first one minimised. Returns the last step, each optimizer step's mean losses, and its clock."""
    accelerator, model = loop.accelerator, loop.model
    history: list[list[float]] = []
    model.train()
    clock = StepClock(loop.total, first_step=step, synchronize=synchronizer(accelerator.device))
    clock.start()
    try:
        step = _optimise(loop, options, losses, step, history, clock, checkpoints, progress)
    finally:
        if loop.input_grad_hook is not None:
            loop.input_grad_hook.remove()
    model.eval()
    accelerator.wait_for_everyone()
    return step, history, clock


def _optimise(
    loop: Loop,
    options: FitOptions,
    losses: Callable[[Any, dict[str, torch.Tensor]], Sequence[torch.Tensor]],
    step: int,
    history: list[list[float]],
    clock: StepClock,
    checkpoints: Checkpoints | None,
    progress: ProgressHook | None,
) -> int:
    """:func:`run_loop`'s steps; returns the last step."""
    accelerator, model, optimizer, scheduler = loop.accelerator, loop.model, loop.optimizer, loop.scheduler
    while step < loop.total:
        epoch, done_in_epoch = divmod(step, loop.steps_per_epoch)
        loop.loader.set_epoch(epoch)
        skip = done_in_epoch * options.grad_accum
        batches = accelerator.skip_first_batches(loop.loader, skip) if skip else loop.loader
        sums: list[float] | None = None
        micro = 0
        for batch in batches:
            with accelerator.accumulate(model):
                if loop.cuda_graphs:  # the last step's graph outputs are done with: they may be overwritten
                    torch.compiler.cudagraph_mark_step_begin()
                values = losses(model, batch)
                accelerator.backward(values[0])
                floats = [value.detach().float().item() for value in values]
                sums = floats if sums is None else [a + b for a, b in zip(sums, floats, strict=True)]
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
            clock.tick(step)
            history.append([value / micro for value in sums or []])
            sums, micro = None, 0
            if progress is not None:
                progress(step, loop.total, history[-1][0])
            if checkpoints is not None and options.save_steps and step % options.save_steps == 0:
                state = checkpoints.state(step)
                if accelerator.is_main_process:
                    save_checkpoint(checkpoints.directory / f"step-{step}", state, file=checkpoints.file)
            if step >= loop.total:
                break
    return step
