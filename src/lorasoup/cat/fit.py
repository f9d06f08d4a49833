"""Train the CAT weights, and only them, with accelerate (one CPU, one GPU, or several through DDP).

Checkpoints hold just ``θ``, the optimizer and scheduler state, the step and the RNG state: a few
kilobytes. The data order is a function of (seed, epoch), so a resumed run sees exactly the batches
the uninterrupted run would have seen and ends with the same weights.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset

from lorasoup.cat import stacked
from lorasoup.cat.inject import CatComposition
from lorasoup.devices import default_device
from lorasoup.options import FitOptions
from lorasoup.training import loop as fit_loop
from lorasoup.training.loop import Checkpoints, Collate, FitResult, ProgressHook

CHECKPOINT_FILE = "cat_state.pt"


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    fit_loop.save_checkpoint(path, state, file=CHECKPOINT_FILE)


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    return fit_loop.load_checkpoint(path, file=CHECKPOINT_FILE, kind="CAT")


def fit_cat_weights(
    composition: CatComposition,
    dataset: Dataset,
    collate: Collate,
    options: FitOptions,
    *,
    checkpoint_dir: Path | None = None,
    resume_from: str | Path | None = None,
    progress: ProgressHook | None = None,
) -> FitResult:
    """Train ``composition.weights`` on ``dataset`` with AdamW and linear warm-up/decay
    (``lorasoup.training.loop``); the decoder layers are compiled one by one if ``options.compile`` says,
    and under CUDA graphs on one GPU each module's ``[W0; A]`` is stacked for the run
    (``lorasoup.cat.stacked``, :func:`stacking_device`)."""
    with stacked_base(composition, stacking_device(options)):
        return _fit(composition, dataset, collate, options, checkpoint_dir, resume_from, progress)


def stacking_device(options: FitOptions) -> str | None:
    """The device training stacks the base weight with ``A`` on, or None: where it was measured to pay
    (an H100, CUDA graphs: docs/benchmarks.md), i.e. ``compile: reduce-overhead`` on one CUDA device,
    no process group (under FSDP the base weights are sharded parameters, not free to become views)."""
    device = default_device(options.device)
    single = int(os.environ.get("WORLD_SIZE", "1")) == 1
    return device if options.compile == "reduce-overhead" and device.startswith("cuda") and single else None


@contextmanager
def stacked_base(composition: CatComposition, device: str | None) -> Iterator[None]:
    """The composition's modules stacked on ``device`` while the block runs (None: not stacked), plain
    again after it (also on error). The model goes to ``device`` first, as accelerate would move it:
    moving a stacked module would copy its ``W0`` and ``A`` apart from the stacked matrix (twice
    the frozen weights' memory)."""
    if device is None:
        yield
        return
    composition.model.to(device)
    stacked.stack(composition.model)
    try:
        yield
    finally:
        stacked.unstack(composition.model)


def _fit(
    composition: CatComposition,
    dataset: Dataset,
    collate: Collate,
    options: FitOptions,
    checkpoint_dir: Path | None,
    resume_from: str | Path | None,
    progress: ProgressHook | None,
) -> FitResult:
    theta = composition.weights.theta
    loop = fit_loop.prepare_loop(
        composition.model, [theta], dataset, collate, options, compile_mode=options.compile
    )
    step = 0
    if resume_from is not None:
        state = load_checkpoint(resume_from)
        with torch.no_grad():
            theta.copy_(state["theta"])
        step = loop.restore(state)

    def checkpoint_state(at: int) -> dict[str, Any]:
        # Under FSDP2 θ is sharded: every process takes part in gathering it, one saves it.
        return {"theta": composition.weights.full_theta().detach().cpu(), **loop.state(at)}

    checkpoints = (
        None if checkpoint_dir is None else Checkpoints(checkpoint_dir, CHECKPOINT_FILE, checkpoint_state)
    )
    start = time.perf_counter()
    result = FitResult(steps=step, resumed_from_step=step)
    result.steps, history, clock = fit_loop.run_loop(
        loop,
        options,
        lambda model, batch: (fit_loop.language_model_loss(model, batch),),
        step=step,
        checkpoints=checkpoints,
        progress=progress,
    )
    composition.weights.gather_()  # export and run.json read θ on the main process only
    result.losses = [losses[0] for losses in history]
    result.seconds = time.perf_counter() - start
    result.throughput, result.device = clock.rates(), str(loop.accelerator.device)
    return result
