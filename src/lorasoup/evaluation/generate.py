"""Batched generation for evaluation: left padding, KV cache, stop strings, greedy by default.

``generate(model, tokenizer, prompts, settings)`` returns one :class:`Generation` per prompt, in the
prompts' order, whatever the batching:

* **Batching.** Prompts are tokenised once, sorted by length (longest first, so a batch that does not
  fit in memory fails at once) and cut into batches of ``batch_size``; each batch is left-padded so
  every row's last prompt token sits at the same position, and the attention mask hides the padding.
  Results go back to the input order.
* **Decoding.** Greedy by default, which is deterministic. ``do_sample`` draws with temperature and
  top-p from one ``torch.Generator`` per prompt, seeded from ``(seed, prompt text)``: a prompt's sample
  does not depend on the batch it lands in, and the global RNG is never touched (the draw happens in a
  logits processor that leaves one finite logit, which the greedy step then picks).
  :data:`PAPER_SAMPLING` holds the LoRA Soups reference settings (temperature 0.1, top-p 0.95,
  https://arxiv.org/abs/2410.13025, ``cat_eval.py``).
* **Stopping.** A row stops at EOS, at ``max_new_tokens``, or once its new text contains one of the
  ``stop`` strings (checked every step on the row's last few tokens, so finished rows stop costing
  compute); the returned text is cut before the earliest stop string.
* **Cache.** ``cache_implementation="dynamic"`` (default) grows the KV cache per step; ``"static"``
  preallocates it, which lets transformers compile the decoding step (CUDA graphs) on a GPU.

Only new tokens are decoded: the reference code decoded prompt + generation and split on the first
``### Response:``, i.e. a few-shot demo's answer. The model's own ``generation_config`` is not used
for decoding choices (sampling, penalties): results depend on ``settings`` alone.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, fields, replace
from typing import TYPE_CHECKING, Any, Literal

import torch

from lorasoup.config import require
from lorasoup.errors import ConfigError, DataError

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

FinishReason = Literal["stop", "eos", "length"]
Progress = Callable[[int, int], None]
"""``(prompts done, prompts total)`` after each batch."""

PAPER_SAMPLING: dict[str, Any] = {"do_sample": True, "temperature": 0.1, "top_p": 0.95}
"""The reference evaluation's decoding (``cat_eval.py``: ``do_sample=True``, T=0.1, top-p 0.95, batch 1)."""


@dataclass
class GenerationSettings:
    """How to decode. Defaults: greedy, 256 new tokens, batches of 8, no stop string."""

    max_new_tokens: int = 256
    batch_size: int = 8
    stop: list[str] = field(default_factory=list)
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int = 0
    cache_implementation: Literal["dynamic", "static"] = "dynamic"
    sort_by_length: bool = True
    ignore_eos: bool = False

    def validate(self) -> None:
        require(self.max_new_tokens >= 1, f"max_new_tokens must be at least 1, got {self.max_new_tokens}")
        require(self.batch_size >= 1, f"batch_size must be at least 1, got {self.batch_size}")
        require(all(isinstance(s, str) and s for s in self.stop), "stop strings must be non-empty strings")
        require(self.temperature > 0, f"temperature must be positive, got {self.temperature}")
        require(0 < self.top_p <= 1, f"top_p must be in (0, 1], got {self.top_p}")
        require(
            self.cache_implementation in ("dynamic", "static"),
            f"cache_implementation must be 'dynamic' or 'static', got {self.cache_implementation!r}",
        )


@dataclass
class GenerationOptions:
    """A partial :class:`GenerationSettings` (``None`` = keep) for task specs and run configs.

    ``sampling: paper`` applies :data:`PAPER_SAMPLING` first; explicit fields then override it.
    """

    max_new_tokens: int | None = None
    batch_size: int | None = None
    stop: list[str] | None = None
    sampling: Literal["greedy", "paper"] | None = None
    do_sample: bool | None = None
    temperature: float | None = None
    top_p: float | None = None
    seed: int | None = None
    cache_implementation: Literal["dynamic", "static"] | None = None
    ignore_eos: bool | None = None

    def apply(self, settings: GenerationSettings) -> GenerationSettings:
        """``settings`` with this object's non-None values laid over it, validated."""
        changes: dict[str, Any] = {}
        if self.sampling == "paper":
            changes.update(PAPER_SAMPLING)
        elif self.sampling == "greedy":
            changes["do_sample"] = False
        names = {f.name for f in fields(GenerationSettings)}
        for item in fields(self):
            value = getattr(self, item.name)
            if item.name in names and value is not None:
                changes[item.name] = list(value) if isinstance(value, list) else value
        result = replace(settings, **changes)
        result.validate()
        return result


@dataclass(frozen=True)
class Generation:
    """One prompt's continuation: text cut before any stop string, and token counts for throughput."""

    text: str
    prompt_tokens: int
    new_tokens: int
    finish_reason: FinishReason


GenerateFn = Callable[[Sequence[str], GenerationSettings], list[Generation]]
"""What every evaluation backend hands the runner: ``(prompts, settings) -> generations``."""


def truncate_at_stop(text: str, stop: Sequence[str]) -> tuple[str, bool]:
    """``text`` cut before the earliest occurrence of any stop string, and whether one occurred."""
    cut = min((i for i in (text.find(s) for s in stop) if i >= 0), default=-1)
    return (text[:cut], True) if cut >= 0 else (text, False)


def encode_prompt(tokenizer: PreTrainedTokenizerBase, prompt: str) -> list[int]:
    """Token ids of ``prompt``, with BOS first when the tokenizer adds one and the text does not hold it.

    The same rule as training (``lorasoup.training.data``): a chat-template prompt that already renders
    BOS does not get a second one.
    """
    ids = list(tokenizer(prompt, add_special_tokens=False)["input_ids"])
    bos = tokenizer.bos_token_id
    if bos is not None and (not ids or ids[0] != bos):
        with_specials = tokenizer("", add_special_tokens=True)["input_ids"]
        if with_specials and with_specials[0] == bos:
            ids = [bos, *ids]
    return ids


def generate(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    settings: GenerationSettings | None = None,
    *,
    progress: Progress | None = None,
) -> list[Generation]:
    """Continue every prompt with an HF causal LM (or a PEFT model wrapping one); see the module doc."""
    settings = settings or GenerationSettings()
    settings.validate()
    plan = plan_prompts(model, tokenizer, prompts, settings)

    def batch(rows: list[int]) -> list[Generation]:
        seeds = [prompt_seed(settings.seed, prompts[i]) for i in rows]
        encoded = [plan.encoded[i] for i in rows]
        return _generate_batch(model, tokenizer, encoded, seeds, settings, plan.eos_ids, plan.pad_id)

    return plan.run(settings.batch_size, batch, progress)


@dataclass(frozen=True)
class PromptPlan:
    """What every backend decides before decoding: token ids per prompt (length-checked), the order
    the batches take them in (longest first unless ``sort_by_length`` is off), the EOS ids and the pad id."""

    encoded: list[list[int]]
    order: list[int]
    eos_ids: list[int]
    pad_id: int

    def run(
        self,
        batch_size: int,
        batch: Callable[[list[int]], list[Generation]],
        progress: Progress | None = None,
    ) -> list[Generation]:
        """``batch(rows)`` (the generations of the prompts at indices ``rows``) over batches of
        ``batch_size`` in :attr:`order`; the results in the prompts' order."""
        results: list[Generation | None] = [None] * len(self.encoded)
        for start in range(0, len(self.order), batch_size):
            rows = self.order[start : start + batch_size]
            for i, generation in zip(rows, batch(rows), strict=True):
                results[i] = generation
            if progress is not None:
                progress(min(start + batch_size, len(self.order)), len(self.order))
        return [r for r in results if r is not None]


def plan_prompts(
    model: Any, tokenizer: PreTrainedTokenizerBase, prompts: Sequence[str], settings: GenerationSettings
) -> PromptPlan:
    encoded = [encode_prompt(tokenizer, p) for p in prompts]
    _check_lengths(model, encoded, settings.max_new_tokens)
    order = list(range(len(prompts)))
    if settings.sort_by_length:
        order.sort(key=lambda i: -len(encoded[i]))
    eos_ids = _eos_ids(model, tokenizer)
    return PromptPlan(encoded, order, eos_ids, _pad_id(tokenizer, eos_ids))


def prompt_seed(seed: int, prompt: str) -> int:
    """A 63-bit seed from the run seed and the prompt text, so a prompt's sample ignores batching."""
    digest = hashlib.sha256(f"{seed}\x00{prompt}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def _generate_batch(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    encoded: list[list[int]],
    seeds: list[int],
    settings: GenerationSettings,
    eos_ids: list[int],
    pad_id: int,
) -> list[Generation]:
    from transformers import GenerationConfig, LogitsProcessorList, StoppingCriteriaList

    device = _device_of(model)
    input_ids, attention_mask = left_pad(encoded, pad_id)  # (B, P), (B, P)
    prompt_len = input_ids.shape[1]
    config = GenerationConfig(
        max_new_tokens=settings.max_new_tokens,
        # ignore_eos: EOS is masked for every step, so each row runs the full length (benchmarks)
        min_new_tokens=settings.max_new_tokens if settings.ignore_eos else 0,
        do_sample=False,  # sampling, when asked for, happens in _SeededSampler (see the module doc)
        num_beams=1,
        repetition_penalty=1.0,
        no_repeat_ngram_size=0,
        eos_token_id=eos_ids or None,
        pad_token_id=pad_id,
        cache_implementation=settings.cache_implementation,
        use_cache=True,
    )
    processors = LogitsProcessorList()
    if settings.do_sample:
        processors.append(_SeededSampler(settings.temperature, settings.top_p, seeds))
    stopper = _StopStrings(tokenizer, settings.stop, prompt_len) if settings.stop else None
    with torch.inference_mode():
        sequences = model.generate(
            input_ids=input_ids.to(device),
            attention_mask=attention_mask.to(device),
            generation_config=config,
            logits_processor=processors,
            stopping_criteria=StoppingCriteriaList([stopper] if stopper else []),
        )
    new = sequences[:, prompt_len:].tolist()
    return [
        _finish(
            tokenizer, tokens, len(prompt), eos_ids, settings, stopper.done_at.get(row) if stopper else None
        )
        for row, (tokens, prompt) in enumerate(zip(new, encoded, strict=True))
    ]


def _finish(
    tokenizer: PreTrainedTokenizerBase,
    tokens: list[int],
    prompt_tokens: int,
    eos_ids: list[int],
    settings: GenerationSettings,
    stopped_at: int | None,
) -> Generation:
    """Decode one row's new tokens: cut at EOS, then before the earliest stop string."""
    reason: FinishReason = "length"
    count = len(tokens)
    if not settings.ignore_eos:
        eos_at = next((i for i, t in enumerate(tokens) if t in eos_ids), None)
        if eos_at is not None:
            tokens, count, reason = tokens[:eos_at], eos_at + 1, "eos"
    text, hit = truncate_at_stop(tokenizer.decode(tokens, skip_special_tokens=True), settings.stop)
    if hit:
        # tokens after a stop are padding; count those generated up to the step that saw the stop
        reason, count = "stop", min(count, stopped_at) if stopped_at is not None else count
    return Generation(text=text, prompt_tokens=prompt_tokens, new_tokens=count, finish_reason=reason)


def left_pad(encoded: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(input_ids, attention_mask)``, both (B, P) int64, each row right-aligned after its padding."""
    width = max(len(ids) for ids in encoded)
    input_ids = torch.full((len(encoded), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(encoded), width), dtype=torch.long)
    for row, ids in enumerate(encoded):
        if ids:
            input_ids[row, width - len(ids) :] = torch.tensor(ids, dtype=torch.long)
            attention_mask[row, width - len(ids) :] = 1
    return input_ids, attention_mask


class _StopStrings:
    """Stopping criterion: a row is done once the text of its new tokens contains a stop string.

    Called by ``generate`` after every step with ``input_ids`` (B, P + t). Only the last ``window``
    tokens are decoded (a stop string completed this step lies there); ``done_at[row]`` keeps how many
    tokens the row had generated then. Returns a (B,) bool tensor: transformers stops each row apart.
    """

    def __init__(self, tokenizer: PreTrainedTokenizerBase, stop: Sequence[str], prompt_len: int) -> None:
        self.tokenizer = tokenizer
        self.stop = list(stop)
        self.prompt_len = prompt_len
        # a token decodes to at least one character, plus slack for tokens that decode to nothing
        self.window = max(len(s) for s in self.stop) + 8
        self.done_at: dict[int, int] = {}

    def __call__(self, input_ids: torch.Tensor, scores: Any, **kwargs: Any) -> torch.Tensor:
        new = input_ids[:, self.prompt_len :]
        tails = new[:, -self.window :].tolist()
        texts = self.tokenizer.batch_decode(tails, skip_special_tokens=True)
        for row, text in enumerate(texts):
            if row not in self.done_at and any(s in text for s in self.stop):
                self.done_at[row] = new.shape[1]
        flags = [row in self.done_at for row in range(len(texts))]
        return torch.tensor(flags, dtype=torch.bool, device=input_ids.device)


class _SeededSampler:
    """Logits processor that samples (temperature, top-p) with one private generator per row.

    ``scores`` (B, V) → (B, V) with 0 at the drawn token and -inf elsewhere, so the greedy step picks it.
    Top-p keeps the smallest set of most likely tokens whose mass reaches ``top_p`` (at least one).
    """

    def __init__(self, temperature: float, top_p: float, seeds: Sequence[int]) -> None:
        self.temperature = temperature
        self.top_p = top_p
        self.seeds = list(seeds)
        self.generators: list[torch.Generator] | None = None

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if self.generators is None:
            self.generators = [torch.Generator(device=scores.device).manual_seed(s) for s in self.seeds]
        probs = torch.softmax(scores.float() / self.temperature, dim=-1)  # (B, V)
        sorted_probs, sorted_ids = probs.sort(dim=-1, descending=True)
        mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs  # (B, V): mass of strictly likelier tokens
        sorted_probs = sorted_probs.masked_fill(mass_before >= self.top_p, 0.0)
        picks = [
            torch.multinomial(sorted_probs[row], 1, generator=gen) for row, gen in enumerate(self.generators)
        ]
        chosen = sorted_ids.gather(1, torch.stack(picks))  # (B, 1)
        out = torch.full_like(scores, -math.inf)
        return out.scatter_(1, chosen, 0.0)


def _eos_ids(model: Any, tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """EOS ids from the model's generation config (chat models list several), else the tokenizer's."""
    config = getattr(model, "generation_config", None)
    value = getattr(config, "eos_token_id", None) if config is not None else None
    if value is None:
        value = tokenizer.eos_token_id
    ids = [value] if isinstance(value, int) else list(value or [])
    return [int(i) for i in ids]


def _pad_id(tokenizer: PreTrainedTokenizerBase, eos_ids: list[int]) -> int:
    if tokenizer.pad_token_id is not None:
        return int(tokenizer.pad_token_id)
    if eos_ids:
        return eos_ids[0]  # padding is masked out, so its id never reaches a prediction
    raise ConfigError("the tokenizer has neither a pad nor an EOS token; set tokenizer.pad_token")


def _device_of(model: Any) -> torch.device:
    try:
        return next(model.parameters()).device
    except (StopIteration, AttributeError):
        return torch.device("cpu")


def _check_lengths(model: Any, encoded: list[list[int]], max_new_tokens: int) -> None:
    """Refuse empty prompts and prompts that cannot fit the model's context with the new tokens."""
    for i, ids in enumerate(encoded):
        if not ids:
            raise DataError(f"prompt {i} is empty after tokenisation; every prompt needs some text")
    config = getattr(model, "config", None)
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    limit = getattr(text_config, "max_position_embeddings", None) or getattr(text_config, "n_positions", None)
    if not isinstance(limit, int):
        return
    longest = max((len(ids) for ids in encoded), default=0)
    if longest + max_new_tokens > limit:
        index = max(range(len(encoded)), key=lambda i: len(encoded[i]))
        raise DataError(
            f"prompt {index} has {longest} tokens; with max_new_tokens={max_new_tokens} it exceeds the "
            f"model's context of {limit}; lower max_new_tokens, use fewer few-shot demos or a model "
            "with a longer context"
        )
