"""The demo's base model: a small Llama built from a config and pre-trained from scratch on the
benchmark's base language, saved as an ordinary transformers checkpoint directory.

Pre-training a base is not a lorasoup feature (lorasoup composes adapters of existing models), so
this is a plain AdamW loop over lorasoup's own data pipeline. Its randomness is local: model
initialisation runs under ``torch.random.fork_rng`` and batches come from a private generator.
"""

from __future__ import annotations

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


def pretrain_base(
    records: list[dict[str, Any]],
    tokenizer: Any,
    directory: Path,
    *,
    size: BaseModelSize,
    seed: int,
    progress: Callable[[int, int, float], None] | None = None,
    template: str = "plain",
) -> dict[str, float]:
    """Train a fresh model on ``records`` (loss on the responses) and save it with its tokenizer.

    ``template``: how records become prompts (``verbatim`` for records already rendered in a format).
    """
    model = build_model(size, tokenizer, seed)
    dataset = build_dataset(records, tokenizer, template=template, cutoff_len=64, name="demo base")
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_size=size.batch_size,
        shuffle=True,
        drop_last=True,
        collate_fn=functools.partial(collate, pad_token_id=tokenizer.pad_token_id),
        generator=torch.Generator().manual_seed(seed),
    )
    optimizer = torch.optim.AdamW(model.parameters(), lr=size.learning_rate, weight_decay=0.0)
    warmup = max(1, size.steps // 30)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda s: (
            min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s, size.steps) / size.steps))
        ),
    )
    model.train()
    step, first, last = 0, math.nan, math.nan
    while step < size.steps:
        for batch in loader:
            loss = model(**batch).loss
            loss.backward()
            optimizer.step()
            schedule.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            last = float(loss.detach())
            first = last if step == 1 else first
            if progress is not None:
                progress(step, size.steps, last)
            if step >= size.steps:
                break
    model.eval()
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return {
        "first_loss": first,
        "last_loss": last,
        "steps": step,
        "parameters": sum(p.numel() for p in model.parameters()),
    }
