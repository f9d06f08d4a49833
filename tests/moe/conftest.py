"""Two real PEFT adapters on the tiny Llama (one adapts fewer modules, at another rank) and some data."""

from __future__ import annotations

import functools
import json
from collections.abc import Callable
from pathlib import Path

import pytest
from transformers import AutoModelForCausalLM

from lorasoup.adapters import LoraAdapter, load_adapter
from lorasoup.moe.inject import MoeComposition, compose_moe
from lorasoup.training.data import build_dataset, collate

RECORDS = [
    {"instruction": f"what is {a} plus {b} ?", "output": f"the answer is {a + b}"}
    for a in range(6)
    for b in range(4)
]


@pytest.fixture
def adapter_dirs(make_lora) -> dict[str, Path]:
    return {
        "math": make_lora("math", seed=1),
        "code": make_lora("code", r=2, seed=2, targets=["q_proj", "v_proj"]),
    }


@pytest.fixture
def adapters(adapter_dirs) -> list[LoraAdapter]:
    return [load_adapter(path, name=name) for name, path in adapter_dirs.items()]


@pytest.fixture
def compose(llama_dir, adapters) -> Callable[..., MoeComposition]:
    """``compose(**compose_moe options)`` → a MoE on a freshly loaded tiny Llama."""

    def make(**options: object) -> MoeComposition:
        return compose_moe(AutoModelForCausalLM.from_pretrained(llama_dir), adapters, **options)

    return make


@pytest.fixture
def data(tokenizer):
    dataset = build_dataset(RECORDS, tokenizer, template="plain", cutoff_len=64)
    return dataset, functools.partial(collate, pad_token_id=tokenizer.pad_token_id)


@pytest.fixture
def data_file(tmp_path) -> Path:
    path = tmp_path / "mix.json"
    path.write_text(json.dumps(RECORDS))
    return path
