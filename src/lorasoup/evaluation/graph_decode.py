"""Greedy generation with the decoding step captured once as a CUDA graph and replayed per token.

``GraphGenerator(model, tokenizer).generate(prompts, settings)`` returns what
:func:`lorasoup.evaluation.generate.generate` returns for greedy settings: the same prompt encoding,
length-sorted batches, left padding, EOS / stop-string / ``max_new_tokens`` handling and order of
results; on a CPU (fp32) the tokens are identical (tested). Sampling is refused (use backend ``hf``).

What it removes from ``model.generate`` with a static cache: the Python around every step (logits
processors, stopping criteria, a growing ``input_ids``) and the host sync that tests for the end, during
which the GPU waits. Here one step is a fixed-shape call with every input in a preallocated tensor:

* **KV cache.** One tensor pair per layer, ``(B, kv_heads, L, head_dim)``, allocated by the first
  prefill and reused by every later batch (a ``transformers.Cache`` whose layers write at a shared
  device-side slot, so no Python int changes between steps). ``L`` covers the longest prompt plus
  ``max_new_tokens``; it is allocated outside the graphs' memory pool, so capture does not copy it.
* **Prefill** runs eagerly once per batch with a 4D additive mask (causal, padding hidden; the
  dtype's minimum rather than -inf, so an all-padding query row stays finite).
* **Decode step** ``(B, 1)``: unmask the slot being written in a preallocated ``(B, 1, 1, L)``
  additive mask, run the model (a 4D mask is used as is by transformers' ``masking_utils``, so no
  mask is built and no value is read on the host), argmax on the device, then bump the token,
  position, slot and step tensors in place. On CUDA it is captured with ``torch.cuda.CUDAGraph``
  (after warm-up steps on a side stream, whose effects are undone) and replayed per token.
* **Attention window.** Keys and values are read up to the next multiple of ``window_step`` past the
  slot being written, not the whole ``L``: one graph per window (they share one memory pool), so a
  short batch does not pay for the longest one and each step reads about what it needs.
* **Host checks** (EOS, stop strings) copy the new tokens to the host every ``check_every`` steps
  only; rows that finished keep decoding harmlessly and are cut afterwards exactly as the HF path
  cuts them (its rows, padding included, are rebuilt and passed through the same ``_finish``).
* **Last batch.** A batch with fewer prompts than the cache's rows is filled with copies of its first
  prompt, so the captured graphs serve it; their outputs are dropped.
* **Shared prefix.** When every prompt of a call begins with the same ``min_shared_prefix`` tokens or
  more (few-shot demos), that prefix is prefilled once and kept once per layer; the cache holds each
  row's suffix and continuation, and attention joins the two exactly (:mod:`.shared_prefix`). The
  prefix is kept for later calls that share it.

On a CPU nothing is captured: the same step runs eagerly (the warm-up and undo run too), which is what
the tests check. Limits: greedy only; full-attention decoder-only models (a sliding window shorter
than ``L``, or linear/recurrent layers, are refused); attention ``sdpa`` or ``eager``.
"""

from __future__ import annotations

import contextlib
import inspect
import time
from collections.abc import Callable, Iterator, Sequence
from functools import partial
from typing import TYPE_CHECKING, Any, Literal

import torch

from lorasoup.errors import ConfigError
from lorasoup.evaluation import shared_prefix as prefixes
from lorasoup.evaluation.decode_state import DecodeState, FinishTracker, Slots, cache_layer_class
from lorasoup.evaluation.generate import (
    Generation,
    GenerationSettings,
    Progress,
    _device_of,
    left_pad,
    plan_prompts,
)

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

DecodeAttention = Literal["model", "sdpa", "eager"]
SdpaBackend = Literal["default", "efficient", "cudnn", "math", "flash"]
PrefixKernel = Literal["torch", "triton"]
WARMUP_STEPS = 3  # eager steps on a side stream before capture, as the PyTorch CUDA graphs notes do


class GraphGenerator:
    """Greedy generation for one model, keeping its KV cache and captured graphs between calls.

    ``capture``: ``None`` captures on CUDA and runs eagerly elsewhere. ``check_every``: steps between
    host checks for EOS / stop strings. ``window_step``: attention-window granularity in cache columns
    (0: always read the whole cache, one graph). ``decode_attention``: the attention implementation of
    the decoding step (``model``: the model's own, ``sdpa`` or ``eager``; prefill always uses the
    model's own) and ``sdpa_backend`` the SDPA kernel it may use (``default``: PyTorch's choice); both
    are tuning knobs for benchmarks. ``min_shared_prefix``: the fewest prompt tokens common to every
    prompt of a call that are prefilled once and shared (0: never share); ``prefix_kernel``: the
    decoding step's shared-prefix attention on CUDA, ``triton`` (two fused kernels,
    :func:`.shared_prefix.attend_decode_fused`; 1.19× the torch path at batch 64 on an H200; where
    Triton or the head size (a power of two, 16 to 256) does not allow it, the torch path is used) or
    ``torch`` (split attention in torch operations). :meth:`release` frees the cache, graphs and
    shared prefix.
    """

    def __init__(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        *,
        capture: bool | None = None,
        check_every: int = 16,
        window_step: int = 64,
        decode_attention: DecodeAttention = "model",
        sdpa_backend: SdpaBackend = "default",
        min_shared_prefix: int = 32,
        prefix_kernel: PrefixKernel = "triton",
    ) -> None:
        if min_shared_prefix < 0:
            raise ConfigError(f"min_shared_prefix must be >= 0 (0: off), got {min_shared_prefix}")
        if prefix_kernel not in ("torch", "triton"):
            raise ConfigError(f"prefix_kernel must be 'torch' or 'triton', got {prefix_kernel!r}")
        if check_every < 1 or window_step < 0 or window_step % 16:
            raise ConfigError(
                f"check_every must be >= 1 and window_step a multiple of 16 (0: off), got {check_every}, "
                f"{window_step}"
            )
        self.model, self.tokenizer = model, tokenizer
        self.device = _device_of(model)
        self.capture = self.device.type == "cuda" if capture is None else capture
        if self.capture and self.device.type != "cuda":
            raise ConfigError(f"capture=True needs the model on a CUDA device, it is on {self.device}")
        self.check_every, self.window_step = check_every, window_step
        self.decode_attention, self.sdpa_backend = decode_attention, sdpa_backend
        self.min_shared_prefix, self.prefix_kernel = min_shared_prefix, prefix_kernel
        self.prefix: prefixes.SharedPrefix | None = None
        self.dtype = model.get_input_embeddings().weight.dtype
        self.min_value = torch.finfo(self.dtype).min
        params = _forward_parameters(model)
        self.cache_arg = "cache" if "cache" in params else "past_key_values"
        self.keep_last = {"logits_to_keep": 1} if "logits_to_keep" in params else {}
        self.state: DecodeState | None = None
        self.stats: dict[str, float] = {}

    def generate(
        self,
        prompts: Sequence[str],
        settings: GenerationSettings | None = None,
        *,
        progress: Progress | None = None,
    ) -> list[Generation]:
        """Greedy continuations of ``prompts`` in their order; see the module doc."""
        settings = settings or GenerationSettings()
        settings.validate()
        if settings.do_sample:
            raise ConfigError(
                "backend 'cudagraph' decodes greedily; use backend 'hf' (--backend hf) for sampling"
            )
        if not prompts:
            return []
        try:
            return self._generate(prompts, settings, progress)
        except prefixes.PrefixNotReached:
            if self.min_shared_prefix == 0:
                raise
            # this model cannot attend to a shared prefix (see PrefixNotReached): never try again
            self.min_shared_prefix = 0
            self.release()
            return self._generate(prompts, settings, progress)

    def _generate(
        self, prompts: Sequence[str], settings: GenerationSettings, progress: Progress | None
    ) -> list[Generation]:
        plan = plan_prompts(self.model, self.tokenizer, prompts, settings)
        shared = prefixes.common_prefix_length(plan.encoded)
        if self.min_shared_prefix == 0 or shared < self.min_shared_prefix:
            shared = 0
        # 16 columns: bf16 mask rows aligned as SDPA's memory-efficient kernel wants them
        length = _round_up(max(len(e) for e in plan.encoded) - shared + settings.max_new_tokens, 16)
        _check_model(self.model, shared + length)
        self.stats = {"prefill_s": 0.0, "decode_s": 0.0, "capture_s": 0.0, "captures": 0, "steps": 0}
        self.stats["shared_prefix_tokens"] = shared
        with torch.inference_mode():
            prefix = self._prefix_for(plan.encoded[0][:shared]) if shared else None
            state = self._state_for(min(settings.batch_size, len(prompts)), length)
            if state.prefix is not prefix:  # the graphs read the old prefix's tensors
                state.graphs.clear()
                state.prefix = prefix

            def batch(rows: list[int]) -> list[Generation]:
                suffixes = [plan.encoded[i][shared:] for i in rows]
                lengths = [len(plan.encoded[i]) for i in rows]
                return self._run_batch(state, suffixes, lengths, settings, plan.eos_ids, plan.pad_id)

            return plan.run(settings.batch_size, batch, progress)

    def release(self) -> None:
        """Drop the KV cache, the captured graphs and the shared prefix (and return their memory to the
        CUDA driver)."""
        self.prefix = None
        self._free_state()

    def _free_state(self) -> None:
        if self.state is not None:
            self.state.graphs.clear()
        self.state = None
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.empty_cache()

    def _state_for(self, batch: int, length: int) -> DecodeState:
        """The current state if it has enough rows and columns, else a new one (the old one freed first)."""
        if self.state is not None and self.state.batch >= batch and self.state.length >= length:
            return self.state
        self._free_state()
        slots = Slots(torch.zeros(1, dtype=torch.long, device=self.device))
        cache = self._slot_cache(slots, length)

        def longs(*shape: int) -> torch.Tensor:
            return torch.zeros(shape, dtype=torch.long, device=self.device)

        self.state = DecodeState(
            batch=batch,
            length=length,
            cache=cache,
            slots=slots,
            tokens=longs(batch, 1),
            positions=longs(batch, 1),
            step=longs(1),
            out=longs(batch, length),
            mask=torch.full((batch, 1, 1, length), self.min_value, dtype=self.dtype, device=self.device),
            pool=torch.cuda.graph_pool_handle() if self.capture else None,
        )
        return self.state

    def _slot_cache(self, slots: Slots, length: int) -> Any:
        """A ``transformers.Cache`` of one :func:`cache_layer_class` layer of ``length`` columns per layer."""
        from transformers.cache_utils import Cache

        config = self.model.config
        text = config.get_text_config() if hasattr(config, "get_text_config") else config
        layer = cache_layer_class()
        return Cache(layers=[layer(slots, length) for _ in range(text.num_hidden_layers)])

    def _prefix_for(self, tokens: list[int]) -> prefixes.SharedPrefix:
        """The shared prefix of ``tokens``: the one kept from an earlier call if it is the same, else
        prefilled now (batch 1, the model's own attention, positions from 0)."""
        if self.prefix is not None and self.prefix.tokens == tuple(tokens):
            return self.prefix
        self.prefix = None  # freed before the new one is made
        began = time.perf_counter()
        width = len(tokens)
        slots = Slots(torch.zeros(1, dtype=torch.long, device=self.device), window=width)
        cache = self._slot_cache(slots, width)
        causal = torch.ones(width, width, dtype=torch.bool, device=self.device).tril_()
        mask = torch.zeros(1, 1, width, width, dtype=self.dtype, device=self.device)
        mask.masked_fill_(~causal, self.min_value)
        ids = torch.tensor([tokens], device=self.device)
        positions = torch.arange(width, device=self.device)[None]
        self._forward(ids, positions, mask, cache, **self.keep_last)
        self.prefix = prefixes.SharedPrefix(
            tokens=tuple(tokens),
            keys=[layer.keys[0] for layer in cache.layers],
            values=[layer.values[0] for layer in cache.layers],
            fused=self.prefix_kernel == "triton",
        )
        self.stats["prefill_s"] += time.perf_counter() - began
        return self.prefix

    def _run_batch(
        self,
        state: DecodeState,
        encoded: list[list[int]],
        prompt_lengths: list[int],
        settings: GenerationSettings,
        eos_ids: list[int],
        pad_id: int,
    ) -> list[Generation]:
        """Prefill, then replay the step until every row stopped or ``max_new_tokens`` were made.

        ``encoded``: each row's tokens after the shared prefix (all of them without one);
        ``prompt_lengths``: each whole prompt's length, for the results."""
        rows, limit = len(encoded), settings.max_new_tokens
        # filler rows (copies of the first prompt) keep the captured shapes; their outputs are dropped
        input_ids, attention_mask = left_pad(encoded + [encoded[0]] * (state.batch - rows), pad_id)
        width = input_ids.shape[1]
        tracker = FinishTracker(self.tokenizer, settings, eos_ids, rows)
        began = time.perf_counter()
        with self._prefix_attention(state):
            self._prefill(state, input_ids, attention_mask, eos_ids if settings.ignore_eos else [])
        tracker.feed(state.out[:rows, :1].tolist())  # the host sync also ends the prefill's timing
        decoding = time.perf_counter()
        self.stats["prefill_s"] += decoding - began
        produced = 1
        with self._decode_context(state):
            while produced < limit and not tracker.all_done:
                self._replay(state, self._window(width + produced - 1, state.length))
                produced += 1
                if produced % self.check_every == 0 or produced == limit:
                    tracker.feed(state.out[:rows, len(tracker.tokens[0]) : produced].tolist())
        self.stats["decode_s"] += time.perf_counter() - decoding
        self.stats["steps"] += produced - 1
        return tracker.generations(prompt_lengths, pad_id)

    def _prefill(
        self, state: DecodeState, input_ids: torch.Tensor, attention_mask: torch.Tensor, banned: list[int]
    ) -> None:
        """Run the padded prompts (B, W) once: fills cache columns 0..W-1 and the first new token.

        With a shared prefix of P tokens the prompts are the rows' suffixes, at positions from P."""
        valid = attention_mask.to(self.device).bool()  # (B, W)
        width = valid.shape[1]
        causal = torch.ones(width, width, dtype=torch.bool, device=self.device).tril_()  # (W, W)
        allowed = causal[None, None] & valid[:, None, None, :]  # (B, 1, W, W): key <= query, not padding
        mask = torch.zeros(allowed.shape, dtype=self.dtype, device=self.device)
        mask.masked_fill_(~allowed, self.min_value)  # finite: an all-padding query row stays NaN-free
        positions = (valid.long().cumsum(-1) - 1).clamp_(min=0)  # (B, W), as HF's generate
        if state.prefix is not None:
            positions += state.prefix.length
        state.slots.position.zero_()
        state.slots.window = width
        logits = self._forward(
            input_ids.to(self.device), positions, mask, state.cache, state.prefix, **self.keep_last
        )
        if state.bias is None:
            state.bias = torch.zeros(logits.shape[-1], dtype=torch.float32, device=self.device)
        state.bias.zero_()
        if banned:  # ignore_eos: HF's min_new_tokens masks EOS at every step
            state.bias[banned] = -float("inf")
        chosen = self._pick(logits, state.bias)  # (B, 1)
        state.tokens.copy_(chosen)
        state.out[:, :1].copy_(chosen)
        state.positions.copy_(positions[:, -1:] + 1)
        state.slots.position.fill_(width)
        state.step.fill_(1)
        state.mask.fill_(self.min_value)
        state.mask[:, 0, 0, :width].masked_fill_(valid, 0.0)

    def _step(self, state: DecodeState, window: int) -> None:
        """One decoding step on the state's tensors, in place; the body of each captured graph."""
        state.mask.index_fill_(3, state.slots.position, 0.0)  # the token written now sees itself
        state.slots.window = window
        logits = self._forward(
            state.tokens, state.positions, state.mask[..., :window], state.cache, state.prefix
        )
        chosen = self._pick(logits, state.bias)  # (B, 1)
        state.tokens.copy_(chosen)
        state.out.index_copy_(1, state.step, chosen)
        for counter in (state.positions, state.slots.position, state.step):
            counter.add_(1)

    def _replay(self, state: DecodeState, window: int) -> None:
        step = state.graphs.get(window)
        if step is None:
            step = state.graphs[window] = self._capture(state, window)
        step()

    def _capture(self, state: DecodeState, window: int) -> Callable[[], None]:
        """Warm up and capture the step for ``window``; the state is left as it was found."""
        began = time.perf_counter()
        saved = [t.clone() for t in state.counters]

        def restore() -> None:
            for tensor, value in zip(state.counters, saved, strict=True):
                tensor.copy_(value)

        # a warm-up step writes the slot's cache column, mask entry and output column, which the real
        # step rewrites identically; only the counters need restoring
        self.stats["captures"] += 1
        if not self.capture:
            self._step(state, window)
            restore()
            return partial(self._step, state, window)
        side = torch.cuda.Stream(device=self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            for _ in range(WARMUP_STEPS):
                self._step(state, window)
                restore()
        torch.cuda.current_stream(self.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph, pool=state.pool):
                self._step(state, window)
        except RuntimeError as exc:
            first = " ".join(str(exc).split())[:300]
            raise ConfigError(
                f"could not capture this model's decoding step as a CUDA graph ({first}); use backend 'hf'"
            ) from exc
        torch.cuda.synchronize(self.device)
        self.stats["capture_s"] += time.perf_counter() - began
        return graph.replay

    def _forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        mask: torch.Tensor,
        cache: Any,
        prefix: prefixes.SharedPrefix | None = None,
        **extra: Any,
    ) -> torch.Tensor:
        """Logits (B, T', V) for ``input_ids`` (B, T) at ``positions`` (B, T) under a 4D additive mask;
        with ``prefix``, the attention functions receive it (the shared-prefix attention reads it)."""
        kwargs = {self.cache_arg: cache, **extra}
        if prefix is not None:
            kwargs["shared_prefix"] = prefix
        out = self.model(
            input_ids=input_ids, attention_mask=mask, position_ids=positions, use_cache=True, **kwargs
        )
        return out.logits

    @staticmethod
    def _pick(logits: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        """Greedy pick (B, 1) from the last position's logits, in fp32 as HF's generate scores them."""
        return (logits[:, -1].float() + bias).argmax(-1, keepdim=True)

    def _window(self, slot: int, length: int) -> int:
        """Columns the step writing ``slot`` reads: the next multiple of ``window_step`` past it."""
        if self.window_step == 0:
            return length
        return min(length, (slot // self.window_step + 1) * self.window_step)

    def _prefix_attention(self, state: DecodeState) -> contextlib.AbstractContextManager[None]:
        """With a shared prefix, the shared-prefix attention for the block; else nothing changes."""
        if state.prefix is None:
            return contextlib.nullcontext()
        return _attention_implementation(self.model, prefixes.register())

    @contextlib.contextmanager
    def _decode_context(self, state: DecodeState) -> Iterator[None]:
        """The attention implementation and SDPA kernels asked for, around the decoding steps only
        (the shared-prefix attention when there is a prefix)."""
        with contextlib.ExitStack() as stack:
            if state.prefix is not None:
                stack.enter_context(self._prefix_attention(state))
            elif self.decode_attention != "model":
                stack.enter_context(_attention_implementation(self.model, self.decode_attention))
            if self.sdpa_backend != "default":
                from torch.nn.attention import SDPBackend, sdpa_kernel

                names = {
                    "efficient": SDPBackend.EFFICIENT_ATTENTION,
                    "cudnn": SDPBackend.CUDNN_ATTENTION,
                    "math": SDPBackend.MATH,
                    "flash": SDPBackend.FLASH_ATTENTION,
                }
                stack.enter_context(sdpa_kernel(names[self.sdpa_backend]))
            yield


def generate_graphed(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    settings: GenerationSettings | None = None,
    *,
    progress: Progress | None = None,
) -> list[Generation]:
    """One-shot :class:`GraphGenerator` (the cache and graphs are freed on return)."""
    generator = GraphGenerator(model, tokenizer)
    try:
        return generator.generate(prompts, settings, progress=progress)
    finally:
        generator.release()


@contextlib.contextmanager
def _attention_implementation(model: Any, name: str) -> Iterator[None]:
    """Switch the model's attention implementation for the block (a captured graph keeps its kernels)."""
    config = model.config
    before = config._attn_implementation
    config._attn_implementation = name
    try:
        yield
    finally:
        config._attn_implementation = before


def _check_model(model: Any, length: int) -> None:
    """Refuse what the step cannot serve: other attention kernels, sliding or non-attention layers."""
    config = model.config
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    hint = ", use backend 'hf'"
    implementation = getattr(config, "_attn_implementation", None)
    if implementation not in ("sdpa", "eager"):
        raise ConfigError(
            f"backend 'cudagraph' needs attn_implementation 'sdpa' or 'eager', the model uses "
            f"{implementation!r}; load it with attn_implementation='sdpa'{hint}"
        )
    window = getattr(text, "sliding_window", None)
    # A sliding-window layer (Gemma-3 has five in six) attends as a full one while its window covers
    # every cache column; the check on the window below refuses it otherwise.
    served = {"full_attention"} | ({"sliding_attention"} if isinstance(window, int) else set())
    kinds = sorted(set(getattr(text, "layer_types", None) or ["full_attention"]) - served)
    if kinds:
        raise ConfigError(
            f"backend 'cudagraph' serves full-attention layers only; the model has {kinds}{hint}"
        )
    if isinstance(window, int) and window < length:
        raise ConfigError(
            f"the model attends through a sliding window of {window} tokens, shorter than the "
            f"{length} cache columns needed{hint}"
        )
    if getattr(text, "is_encoder_decoder", False) or getattr(text, "add_cross_attention", False):
        raise ConfigError(f"backend 'cudagraph' serves decoder-only models{hint}")


def _forward_parameters(model: Any) -> set[str]:
    """Parameter names of the underlying transformers model's ``forward`` (through a PEFT wrapper)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return set(inspect.signature(base.forward).parameters)


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple
