"""The state of a graphed decode (``graph_decode.GraphGenerator``): the static KV-cache layer that
writes at a device-side position, the per-batch buffers the CUDA graphs read and write, and the
host-side tracker of which rows have finished.

Every tensor here has a fixed address for the life of a batch shape: graphs captured on them replay
with new values, never new buffers.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from lorasoup.evaluation import shared_prefix as prefixes
from lorasoup.evaluation.generate import Generation, GenerationSettings, _finish

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


@dataclass
class Slots:
    """Shared by every cache layer: where the next key/value goes (device) and how far to read (host)."""

    position: torch.Tensor  # (1,) int64: the cache column the current step writes
    window: int = 0  # columns the attention reads; fixed per captured graph


@functools.cache
def cache_layer_class() -> type:
    """A cache layer holding ``(B, kv_heads, L, head_dim)`` keys and values, written at the shared slot.

    ``update`` writes the new columns at ``slots.position`` and returns views of the first
    ``slots.window`` columns. Defined at first use so that importing this module does not import
    transformers.
    """
    from transformers.cache_utils import CacheLayerMixin

    class SlotLayer(CacheLayerMixin):
        is_sliding = False

        def __init__(self, slots: Slots, length: int) -> None:
            super().__init__()
            self.slots, self.length = slots, length

        def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
            batch, heads = key_states.shape[:2]
            self.keys = key_states.new_zeros((batch, heads, self.length, key_states.shape[-1]))
            self.values = value_states.new_zeros((batch, heads, self.length, value_states.shape[-1]))
            self.device = key_states.device
            self.is_initialized = True

        def update(
            self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
        ) -> tuple[torch.Tensor, torch.Tensor]:
            if not self.is_initialized:
                self.lazy_initialization(key_states, value_states)
            count = key_states.shape[-2]
            at = self.slots.position + torch.arange(count, device=key_states.device)  # (T,)
            self.keys.index_copy_(2, at, key_states)
            self.values.index_copy_(2, at, value_states)
            window = self.slots.window
            return self.keys[:, :, :window], self.values[:, :, :window]

        def get_mask_sizes(self, query_length: int, *args: Any) -> tuple[int, int]:
            return self.slots.window, 0

        def get_seq_length(self) -> int:
            return self.slots.window

        def get_max_length(self) -> int:
            return self.length

        def get_max_cache_shape(self) -> int:
            return self.length

    return SlotLayer


@dataclass(eq=False)
class DecodeState:
    """Everything a captured step reads or writes: fixed addresses for the life of the state."""

    batch: int
    length: int
    cache: Any
    slots: Slots
    tokens: torch.Tensor  # (B, 1) int64: the token the next step feeds
    positions: torch.Tensor  # (B, 1) int64: its position id (per row: left padding shifts them)
    step: torch.Tensor  # (1,) int64: how many tokens each row has generated
    out: torch.Tensor  # (B, L) int64: generated tokens, column = step
    mask: torch.Tensor  # (B, 1, 1, L) model dtype: 0 where a row may attend, dtype min elsewhere
    bias: torch.Tensor | None = None  # (V,) float32 added to the logits: -inf at EOS with ignore_eos
    graphs: dict[int, Callable[[], None]] = field(default_factory=dict)
    pool: Any = None
    prefix: prefixes.SharedPrefix | None = None  # what the graphs were captured with

    @property
    def counters(self) -> tuple[torch.Tensor, ...]:
        return (self.tokens, self.positions, self.slots.position, self.step)


class FinishTracker:
    """When each row stops, decided step by step as generate.py's HF loop decides it.

    At each step ``t`` (tokens generated so far) an unfinished row stops if the decoded text of its
    last ``window`` tokens holds a stop string (``stopped_at = t``, as ``_StopStrings``) or its last
    token is an EOS (unless ``ignore_eos``).
    """

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        settings: GenerationSettings,
        eos_ids: list[int],
        rows: int,
    ) -> None:
        self.tokenizer, self.settings, self.eos = tokenizer, settings, set(eos_ids)
        self.window = max((len(s) for s in settings.stop), default=0) + 8
        self.tokens: list[list[int]] = [[] for _ in range(rows)]
        self.finished: list[int | None] = [None] * rows
        self.stopped_at: list[int | None] = [None] * rows

    @property
    def all_done(self) -> bool:
        return all(f is not None for f in self.finished)

    def feed(self, chunk: list[list[int]]) -> None:
        """Append each row's next tokens (a list per row, all of the same length) and test them."""
        for row, new in enumerate(chunk):
            tokens = self.tokens[row]
            for token in new:
                tokens.append(token)
                if self.finished[row] is None:
                    self._check(row, tokens)

    def _check(self, row: int, tokens: list[int]) -> None:
        if self.settings.stop:
            tail = self.tokenizer.decode(tokens[-self.window :], skip_special_tokens=True)
            if any(s in tail for s in self.settings.stop):
                self.stopped_at[row] = self.finished[row] = len(tokens)
        if not self.settings.ignore_eos and tokens[-1] in self.eos:
            self.finished[row] = len(tokens)

    def generations(self, prompt_tokens: list[int], pad_id: int) -> list[Generation]:
        """Each row as ``model.generate`` returns it (padding after the row stopped), then ``_finish``."""
        limit = self.settings.max_new_tokens
        ends = [f if f is not None else limit for f in self.finished]
        longest = max(ends)
        eos = sorted(self.eos)
        return [
            _finish(
                self.tokenizer,
                self.tokens[row][:end] + [pad_id] * (longest - end),
                prompt_tokens[row],
                eos,
                self.settings,
                self.stopped_at[row],
            )
            for row, end in enumerate(ends)
        ]
