"""The demo's base model: a small Llama built from a config and pre-trained from scratch on the
benchmark's base language, saved as an ordinary transformers checkpoint directory.

Pre-training a base is not a lorasoup feature (lorasoup composes adapters of existing models), so
this is a plain AdamW loop over lorasoup's own data pipeline. Its randomness is local: model
initialisation runs under ``torch.random.fork_rng`` and batches come from a private generator.

On a GPU (``device="cuda"``) the model is built on the CPU from the same seed, then moved; with
``BaseModelSize.cuda_bf16`` the forward passes run under bf16 autocast (weights, gradients, AdamW
state and the saved checkpoint stay fp32). The CPU loop is unchanged by either.
"""

from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lorasoup.training.data import build_dataset, collate


@dataclass(frozen=True)
class BaseModelSize:
    """The base model's shape and pre-training budget (the GPU study scales these)."""

    layers: int = 4
    hidden: int = 128
    intermediate: int = 256
    heads: int = 4
    steps: int = 1500
    batch_size: int = 32
    learning_rate: float = 2e-3
    cuda_bf16: bool = False  # on CUDA only: forward under bf16 autocast, fp32 weights (the CPU ignores it)

    def validate(self) -> None:
        from lorasoup.config import require

        for name in ("layers", "hidden", "intermediate", "heads", "steps", "batch_size"):
            require(getattr(self, name) >= 1, f"base.{name} must be at least 1, got {getattr(self, name)}")
        require(
            self.hidden % self.heads == 0,
            f"base.hidden ({self.hidden}) must be a multiple of base.heads ({self.heads})",
        )
        require(self.learning_rate > 0, f"base.learning_rate must be positive, got {self.learning_rate}")


def build_model(size: BaseModelSize, tokenizer: Any, seed: int) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=size.hidden,
        intermediate_size=size.intermediate,
        num_hidden_layers=size.layers,
        num_attention_heads=size.heads,
        num_key_value_heads=size.heads,
        max_position_embeddings=64,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=False,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return LlamaForCausalLM(config)


def _batch_loader(
    dataset: Any, tokenizer: Any, size: BaseModelSize, seed: int, group_by_length: bool
) -> torch.utils.data.DataLoader:
    """Full batches in an order drawn from a private generator seeded with ``seed``: random, or rows of
    similar length together (``group_by_length``)."""
    generator = torch.Generator().manual_seed(seed)
    order: dict[str, Any] = {"shuffle": True, "generator": generator}
    if group_by_length:
        from transformers.trainer_pt_utils import LengthGroupedSampler

        lengths = [len(row["input_ids"]) for row in dataset]
        order = {"sampler": LengthGroupedSampler(size.batch_size, lengths=lengths, generator=generator)}
    return torch.utils.data.DataLoader(
        dataset,
        batch_size=size.batch_size,
        drop_last=True,
        collate_fn=functools.partial(collate, pad_token_id=tokenizer.pad_token_id),
        **order,
    )


def _optimizer(
    model: torch.nn.Module, size: BaseModelSize, on_gpu: bool
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    """AdamW without weight decay; its rate a cosine decay over ``size.steps`` times a linear warmup
    (the first 1/30 of the steps)."""
    fused = {"fused": True} if on_gpu else {}  # one kernel per step on the GPU; the CPU keeps its default
    optimizer = torch.optim.AdamW(model.parameters(), lr=size.learning_rate, weight_decay=0.0, **fused)
    warmup = max(1, size.steps // 30)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda s: (
            min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s, size.steps) / size.steps))
        ),
    )
    return optimizer, schedule


def _train_steps(
    model: torch.nn.Module,
    loader: torch.utils.data.DataLoader,
    optimizer: torch.optim.Optimizer,
    schedule: torch.optim.lr_scheduler.LambdaLR,
    *,
    steps: int,
    device: str,
    autocast: contextlib.AbstractContextManager[Any],
    progress: Callable[[int, int, float], None] | None,
) -> tuple[int, float, float]:
    """Run ``steps`` optimizer steps, passing over the loader as often as it takes: steps run, first and
    last loss (NaN where none)."""
    model.train()
    step, first, loss = 0, math.nan, torch.tensor(math.nan)
    while step < steps:
        for batch in loader:
            batch = {key: value.to(device) for key, value in batch.items()}
            with autocast:
                loss = model(**batch).loss
            loss.backward()
            optimizer.step()
            schedule.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            if step == 1:
                first = float(loss.detach())
            if progress is not None:  # reading the loss waits for the GPU: only when someone looks
                progress(step, steps, float(loss.detach()))
            if step >= steps:
                break
    return step, first, float(loss.detach())


def bf16_pretraining(device: str, cuda_bf16: bool) -> bool:
    """Whether pre-training on ``device`` runs under bf16 autocast: on CUDA only, where ``cuda_bf16``
    asks (a CPU ignores it, so one setting pre-trains a different base there; the study report's
    ladder says which, from this rule)."""
    return device != "cpu" and cuda_bf16


def pretrain_base(
    records: list[dict[str, Any]],
    tokenizer: Any,
    directory: Path,
    *,
    size: BaseModelSize,
    seed: int,
    progress: Callable[[int, int, float], None] | None = None,
    template: str = "plain",
    device: str = "cpu",
    group_by_length: bool = False,
) -> dict[str, float]:
    """Train a fresh model on ``records`` (loss on the responses) and save it with its tokenizer.

    ``template``: how records become prompts (``verbatim`` for records already rendered in a format);
    ``device``: where it trains (``cpu`` or ``cuda``); ``group_by_length``: batches of rows of similar
    length (transformers' ``LengthGroupedSampler``, as the Trainer's ``group_by_length``), else random.
    """
    model = build_model(size, tokenizer, seed).to(device)
    dataset = build_dataset(records, tokenizer, template=template, cutoff_len=64, name="demo base")
    loader = _batch_loader(dataset, tokenizer, size, seed, group_by_length)
    on_gpu = device != "cpu"
    optimizer, schedule = _optimizer(model, size, on_gpu)
    bf16 = bf16_pretraining(device, size.cuda_bf16)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
    step, first, last = _train_steps(
        model,
        loader,
        optimizer,
        schedule,
        steps=size.steps,
        device=device,
        autocast=autocast,
        progress=progress,
    )
    model.eval()
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return {
        "first_loss": first,
        "last_loss": last,
        "steps": step,
        "parameters": sum(p.numel() for p in model.parameters()),
    }
