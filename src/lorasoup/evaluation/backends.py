"""Evaluation backends, behind one registry: ``hf``, ``cudagraph`` and ``vllm``.

A backend turns an eval config into a ``(prompts, settings) -> generations`` function plus the facts
its runs record in ``run.json``. ``hf`` and ``cudagraph`` generate with the loaded transformers model
(+ PEFT adapter); ``cudagraph`` replays CUDA graphs with a shared prompt prefix and the fused kernels
(``graph_decode``); ``vllm`` loads its own engine. A new backend is one function registered here
(and its name added to ``EvalRunConfig.backend``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lorasoup.devices import DTYPES, default_device
from lorasoup.errors import AdapterError, ConfigError
from lorasoup.evaluation.config import EvalRunConfig
from lorasoup.evaluation.generate import GenerateFn, Generation, GenerationSettings, generate
from lorasoup.registry import Registry

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    from lorasoup.models import ModelSpec

Backend = Callable[[EvalRunConfig, "ModelSpec", "PreTrainedTokenizerBase"], tuple[GenerateFn, dict[str, Any]]]
"""``(config, model spec, tokenizer) -> (generate function, facts for run.json)``."""

BACKENDS: Registry[Backend] = Registry("evaluation backend")


def adapter_dir(source: str) -> Path:
    """The adapter's local directory, its weights checked finite (NaN / inf are refused in one line)."""
    from lorasoup.adapters import check_finite_weights

    return check_finite_weights(source)


def load_peft_model(config: EvalRunConfig, model_spec: ModelSpec) -> tuple[PreTrainedModel, dict[str, Any]]:
    """The base model (+ the config's PEFT adapter) on the config's device, in eval mode, and its facts."""
    from lorasoup.models import load_base_model, model_fingerprint

    local_adapter = adapter_dir(config.adapter) if config.adapter else None  # checked before the model loads
    device = default_device(config.device)
    model = load_base_model(model_spec, dtype=DTYPES[config.dtype], device=device)
    facts = {"backend": config.backend, "device": device, **model_fingerprint(model)}
    if local_adapter is not None:
        from peft import PeftModel

        try:
            model = PeftModel.from_pretrained(model, str(local_adapter), is_trainable=False)
        except (OSError, ValueError, KeyError, RuntimeError) as exc:
            first = " ".join(str(exc).split())[:240]
            raise AdapterError(
                f"could not load adapter {config.adapter!r} onto {config.model!r}: {first}"
            ) from None
        model.eval()
    return model, facts


def model_generator(
    name: str, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, facts: dict[str, Any] | None = None
) -> GenerateFn:
    """A loaded model's ``(prompts, settings) -> generations`` through backend ``name``: ``hf``
    (transformers' ``generate``, greedy or sampling) or ``cudagraph`` (greedy, CUDA-graph replay with a
    shared prompt prefix, ``graph_decode``; it steps eagerly on a CPU). ``facts`` gains what the runs
    used (``shared_prefix_tokens``). vLLM loads its own engine, so it has no in-memory form."""
    facts = {} if facts is None else facts
    if name == "hf":
        return lambda prompts, settings: generate(model, tokenizer, prompts, settings)
    if name != "cudagraph":
        raise ConfigError(f"backend {name!r} cannot generate with a loaded model; use 'hf' or 'cudagraph'")
    from lorasoup.evaluation.graph_decode import GraphGenerator

    generator = GraphGenerator(model, tokenizer)  # keeps its KV cache, graphs and prefix across chunks

    def run(prompts: Sequence[str], settings: GenerationSettings) -> list[Generation]:
        generations = generator.generate(prompts, settings)
        # for run.json: a shared prefix changes the order of attention's sums (bf16 may differ)
        shared = max(facts.get("shared_prefix_tokens", 0), int(generator.stats["shared_prefix_tokens"]))
        facts["shared_prefix_tokens"] = shared
        return generations

    return run


@BACKENDS.register("hf")
def hf_backend(
    config: EvalRunConfig, model_spec: ModelSpec, tokenizer: PreTrainedTokenizerBase
) -> tuple[GenerateFn, dict[str, Any]]:
    """transformers' ``generate`` (greedy or sampling) on the loaded model."""
    model, facts = load_peft_model(config, model_spec)
    return model_generator("hf", model, tokenizer, facts), facts


@BACKENDS.register("cudagraph")
def cudagraph_backend(
    config: EvalRunConfig, model_spec: ModelSpec, tokenizer: PreTrainedTokenizerBase
) -> tuple[GenerateFn, dict[str, Any]]:
    """Greedy decoding by CUDA-graph replay, with a shared prompt prefix (``graph_decode``)."""
    model, facts = load_peft_model(config, model_spec)
    return model_generator("cudagraph", model, tokenizer, facts), facts


@BACKENDS.register("vllm")
def vllm_backend(
    config: EvalRunConfig, model_spec: ModelSpec, tokenizer: PreTrainedTokenizerBase
) -> tuple[GenerateFn, dict[str, Any]]:
    """A vLLM engine of its own (the adapter served as a LoRA request)."""
    from lorasoup.evaluation.vllm_backend import VllmGenerator, import_vllm

    import_vllm()  # the install hint before any other complaint
    if model_spec.gguf_file is not None:
        raise ConfigError(
            "backend 'vllm' needs a transformers checkpoint directory or hub id, not a .gguf file"
        )
    adapter = str(adapter_dir(config.adapter)) if config.adapter else None
    engine = VllmGenerator(model_spec.path, tokenizer, adapter=adapter, dtype=config.dtype)
    return (lambda prompts, settings: engine.generate(prompts, settings)), {"backend": "vllm"}
