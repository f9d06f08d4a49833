"""Tiny models and real PEFT adapters built locally: no downloads anywhere in the default suite."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path

# Triton's interpreter runs lorasoup's GPU kernels on CPU tensors (the tests named "interpreted"). torch
# imports Triton, which reads this as it is imported: so it is set here, before torch, and only where
# there is no NVIDIA GPU (there the -m gpu tests run the compiled kernels instead).
if not Path("/dev/nvidiactl").exists():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
import torch
from transformers import (
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
)

LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "up_proj", "down_proj"]
VOCAB_TEXT = [
    "the cat sat on the mat and wrote a program",
    "what is 12 plus 7 ? the answer is 19",
    "def solution ( ) : return 3 * 4",
    "below is an instruction that describes a task . write a response",
    "### instruction : ### input : ### response :",
    "0 1 2 3 4 5 6 7 8 9 + - * / = ( ) , . : ?",
]


def build_tokenizer(vocab_size: int = 96) -> PreTrainedTokenizerFast:
    """A real byte-level BPE tokenizer trained on a few lines with the ``tokenizers`` library."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    raw = Tokenizer(models.BPE(unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<pad>", "<s>", "</s>", "<unk>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    raw.train_from_iterator(VOCAB_TEXT, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=raw, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )


TINY_DECODER = dict(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=128,
    bos_token_id=1,
    eos_token_id=2,
)
"""The tiny Llama-like shape every decoder test model shares (2 layers, hidden 32, GQA)."""


def build_llama(vocab_size: int, seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab_size, pad_token_id=0, **TINY_DECODER)
    return LlamaForCausalLM(config).eval()


def build_qwen2(vocab_size: int, seed: int = 0) -> Qwen2ForCausalLM:
    torch.manual_seed(seed)
    return Qwen2ForCausalLM(Qwen2Config(vocab_size=vocab_size, **TINY_DECODER)).eval()


def build_gemma3(vocab_size: int, seed: int = 0, sliding_window: int = 128) -> Gemma3ForCausalLM:
    """Gemma-3's traits on the tiny shape: a sliding-window layer then a global one (the 270M model has
    five of one to one of the other, window 512), per-type RoPE, q/k norms, scaled and tied embeddings."""
    torch.manual_seed(seed)
    config = Gemma3TextConfig(
        vocab_size=vocab_size,
        head_dim=8,
        sliding_window=sliding_window,
        layer_types=["sliding_attention", "full_attention"],
        pad_token_id=0,
        **TINY_DECODER,
    )
    return Gemma3ForCausalLM(config).eval()


def build_gpt2(vocab_size: int, seed: int = 0) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=vocab_size, n_embd=32, n_layer=2, n_head=4, n_positions=128)
    return GPT2LMHeadModel(config).eval()


@pytest.fixture(scope="session")
def tokenizer() -> PreTrainedTokenizerFast:
    return build_tokenizer()


def save_tiny(factory: pytest.TempPathFactory, name: str, model: torch.nn.Module, tokenizer) -> Path:
    """A tiny model and the shared tokenizer saved as one checkpoint folder, as a base model is."""
    path = factory.mktemp(name)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def llama_dir(tmp_path_factory: pytest.TempPathFactory, tokenizer: PreTrainedTokenizerFast) -> Path:
    return save_tiny(tmp_path_factory, "tiny-llama", build_llama(len(tokenizer)), tokenizer)


@pytest.fixture(scope="session")
def gpt2_dir(tmp_path_factory: pytest.TempPathFactory, tokenizer: PreTrainedTokenizerFast) -> Path:
    return save_tiny(tmp_path_factory, "tiny-gpt2", build_gpt2(len(tokenizer)), tokenizer)


@pytest.fixture(scope="session")
def gemma3_dir(tmp_path_factory: pytest.TempPathFactory, tokenizer: PreTrainedTokenizerFast) -> Path:
    return save_tiny(tmp_path_factory, "tiny-gemma3", build_gemma3(len(tokenizer)), tokenizer)


def make_peft_lora(
    base_dir: Path,
    out_dir: Path,
    *,
    r: int = 4,
    alpha: int = 8,
    targets: list[str] | None = None,
    seed: int = 0,
    **config_kwargs: object,
) -> Path:
    """Save a real PEFT LoRA adapter with random (non-zero) A and B, made by PEFT itself."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base_dir)
    torch.manual_seed(seed)
    config = LoraConfig(
        r=r,
        lora_alpha=alpha,
        target_modules=targets or LLAMA_TARGETS,
        init_lora_weights=False,  # random B too, so every adapter changes the logits
        **config_kwargs,
    )
    peft_model = get_peft_model(model, config)
    peft_model.save_pretrained(out_dir)
    return out_dir


@pytest.fixture
def make_lora(llama_dir: Path, tmp_path: Path) -> Callable[..., Path]:
    """``make_lora("name", r=..., ...)`` → directory of a PEFT adapter on the tiny Llama."""

    def make(name: str, base_dir: Path | None = None, **kwargs: object) -> Path:
        return make_peft_lora(base_dir or llama_dir, tmp_path / name, **kwargs)

    return make


# `lorasoup demo --set` overrides that make the demo study run in seconds (plumbing, not science);
# shared by the demo, study and report tests.
TINY_DEMO = [
    "base.steps=20",
    "base.layers=1",
    "base.hidden=32",
    "base.intermediate=64",
    "sizes.base=240",
    "sizes.skill=48",
    "sizes.test=12",
    "lora_steps=4",
    "cat_steps=3",
    "batch_size=8",
    "eval_batch_size=12",
    "search_population=4",
    "search_iterations=2",
]


def torchrun(*args: str, processes: int = 2, timeout: int = 300) -> None:
    """``python -m torch.distributed.run --nproc_per_node N ARGS`` on the CPU (gloo), one thread per
    process and this checkout's ``src`` on the path; fails the test with the end of stderr."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).parents[1] / "src")}
    # --standalone: a free port for each run, so back-to-back runs never meet a port still in TIME_WAIT
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    command = [*launcher, "--nproc_per_node", str(processes), *args]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stderr[-3000:]


FSDP_WORKER = """
import json, sys
import torch, torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from transformers import LlamaConfig, LlamaForCausalLM

dist.init_process_group("gloo")
mesh = init_device_mesh("cpu", (2,))
torch.manual_seed(0)
config = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                     vocab_size=64)
"""
"""The start of a two-process FSDP2 worker script: gloo on the CPU, a 2-way mesh, a tiny Llama config.
A test appends its own lines, ends with :data:`FSDP_WORKER_END`, and runs it with :func:`torchrun`."""

FSDP_WORKER_END = """
# Both ranks reach the barrier before either tears gloo down: a rank that destroyed the group while
# its peer was still working made the peer's gloo thread abort ("terminate called without an active
# exception") in about one run in eight.
dist.barrier()
dist.destroy_process_group()
"""


def on_gpu(test: Callable) -> Callable:
    """A test for the GPU machine (``-m gpu``), skipped where there is no CUDA device."""
    reason = "needs a CUDA device (run with -m gpu on the GPU machine)"
    return pytest.mark.gpu(pytest.mark.skipif(not torch.cuda.is_available(), reason=reason)(test))


@pytest.fixture(scope="module")
def triton_interpreter() -> None:
    """For tests that run lorasoup's Triton kernels on CPU tensors, through Triton's interpreter."""
    pytest.importorskip(
        "triton", reason='Triton is not installed (pip install -e ".[test]" brings it on Linux)'
    )
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("an NVIDIA GPU is present: the -m gpu tests run the compiled kernels here")


@pytest.fixture(scope="module")
def one_thread() -> Iterator[None]:
    """One intra-op thread for a module's tests: the tiny models gain nothing from threads, and on a
    small shared CPU OpenMP spinning made their steps 10-100x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
