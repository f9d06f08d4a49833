"""A tiny Llama whose next-token distributions are sharp enough for adapter weights to be identifiable.

The shared tiny Llama (``initializer_range`` 0.02) has near-uniform outputs: its small ``lm_head`` after
the final RMSNorm bounds every logit to well under 1, so no adapter weighting changes the loss by
more than a few thousandths and a searched optimum is noise. With ``initializer_range`` 0.2 the
planted weighting's loss on its own samples is about 1 nat below the base model's.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from tests.conftest import TINY_DECODER, make_peft_lora


@pytest.fixture(scope="session")
def sharp_llama_dir(tmp_path_factory: pytest.TempPathFactory, tokenizer: PreTrainedTokenizerFast) -> Path:
    path = tmp_path_factory.mktemp("sharp-llama")
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), pad_token_id=0, initializer_range=0.2, **TINY_DECODER)
    LlamaForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def strong_adapters(tmp_path_factory: pytest.TempPathFactory, sharp_llama_dir: Path) -> list[Path]:
    """Two random PEFT LoRAs (r=4, scale 4) on the sharp Llama."""
    root = tmp_path_factory.mktemp("strong-adapters")
    return [
        make_peft_lora(sharp_llama_dir, root / name, r=4, alpha=16, seed=seed)
        for name, seed in (("a", 1), ("b", 2))
    ]
