"""Optional vLLM backend: the same :class:`Generation` results as ``generate``, from vLLM's engine.

Used only when asked for (``backend: vllm``) and importable; otherwise a one-line ``ConfigError``
says how to install it. The base model is a transformers checkpoint directory or hub id; an adapter
is served through ``LoRARequest`` (vLLM's ``max_lora_rank`` is set to the serving bucket that holds
the adapter's rank). Prompts go in as token ids made by :func:`encode_prompt`, so both backends see
the same tokens; decoding maps greedy to ``temperature=0`` and sampling to per-prompt seeds derived
as in the HF backend (the draws themselves differ between engines).
"""

from __future__ import annotations

import importlib
import json
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lorasoup.errors import AdapterError, ConfigError
from lorasoup.evaluation.generate import (
    FinishReason,
    Generation,
    GenerationSettings,
    Progress,
    encode_prompt,
    prompt_seed,
    truncate_at_stop,
)

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

INSTALL_HINT = (
    "backend 'vllm' needs the vllm package, which is not installed; pip install vllm, or use --backend hf"
)


def import_vllm() -> Any:
    """The ``vllm`` module, or a one-line ConfigError saying how to get it."""
    try:
        return importlib.import_module("vllm")
    except ImportError:
        raise ConfigError(INSTALL_HINT) from None


def adapter_rank(adapter_dir: str | Path) -> int:
    """The largest rank in a PEFT adapter's ``adapter_config.json`` (``r`` and any ``rank_pattern``)."""
    path = Path(adapter_dir) / "adapter_config.json"
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise AdapterError(f"cannot read {path}: {exc}; pass a PEFT adapter directory") from None
    ranks = [int(config.get("r", 0)), *(int(r) for r in (config.get("rank_pattern") or {}).values())]
    return max(ranks)


class VllmGenerator:
    """Holds one vLLM engine (base model, optionally one LoRA) and generates like ``generate``.

    ``engine_args`` go to ``vllm.LLM`` (e.g. ``gpu_memory_utilization``, ``max_model_len``) and
    ``sampling_args`` to every ``SamplingParams``.
    """

    def __init__(
        self,
        model: str,
        tokenizer: PreTrainedTokenizerBase,
        *,
        adapter: str | None = None,
        dtype: str = "bfloat16",
        seed: int = 0,
        engine_args: dict[str, Any] | None = None,
        sampling_args: dict[str, Any] | None = None,
    ) -> None:
        from lorasoup.export.serving import next_bucket

        vllm = import_vllm()
        self.tokenizer = tokenizer
        kwargs: dict[str, Any] = {"model": model, "dtype": dtype, "seed": seed, **(engine_args or {})}
        self.lora_request = None
        if adapter is not None:
            try:
                bucket = next_bucket(adapter_rank(adapter))
            except ValueError as exc:
                raise AdapterError(f"{adapter}: {exc}; vLLM cannot serve a LoRA of that rank") from None
            kwargs.update(enable_lora=True, max_lora_rank=bucket, max_loras=1)
            lora_module = importlib.import_module("vllm.lora.request")
            self.lora_request = lora_module.LoRARequest("adapter", 1, str(adapter))
        self.vllm = vllm
        self.sampling_args = dict(sampling_args or {})
        self.llm = vllm.LLM(**kwargs)

    def generate(
        self, prompts: Sequence[str], settings: GenerationSettings, *, progress: Progress | None = None
    ) -> list[Generation]:
        settings.validate()
        encoded = [encode_prompt(self.tokenizer, p) for p in prompts]
        params = [self._params(settings, prompt) for prompt in prompts]
        requests = [{"prompt_token_ids": ids} for ids in encoded]
        outputs = self.llm.generate(requests, params, lora_request=self.lora_request, use_tqdm=False)
        if progress is not None:
            progress(len(prompts), len(prompts))
        return [_to_generation(out, len(ids), settings) for out, ids in zip(outputs, encoded, strict=True)]

    def _params(self, settings: GenerationSettings, prompt: str) -> Any:
        sampling = {"temperature": settings.temperature, "top_p": settings.top_p}
        return self.vllm.SamplingParams(
            n=1,
            max_tokens=settings.max_new_tokens,
            stop=list(settings.stop) or None,
            ignore_eos=settings.ignore_eos,
            seed=prompt_seed(settings.seed, prompt) if settings.do_sample else None,
            skip_special_tokens=True,
            **(sampling if settings.do_sample else {"temperature": 0.0}),
            **self.sampling_args,
        )


def _to_generation(output: Any, prompt_tokens: int, settings: GenerationSettings) -> Generation:
    """vLLM's ``RequestOutput`` → ``Generation`` (finish "stop" for a stop string, "eos", or "length")."""
    completion = output.outputs[0]
    text, hit = truncate_at_stop(completion.text, settings.stop)
    reason: FinishReason
    if hit or isinstance(getattr(completion, "stop_reason", None), str):
        reason = "stop"
    elif completion.finish_reason == "length":
        reason = "length"
    else:
        reason = "eos"
    return Generation(
        text=text, prompt_tokens=prompt_tokens, new_tokens=len(completion.token_ids), finish_reason=reason
    )
