"""Prompts that begin alike, prefilled once and attended once per decoding step.

Few-shot evaluation puts the same demos before every question: GSM-Hard's 8-shot PAL prompts share
their first 1,114 tokens, before a question of 72 on average (SmolLM2's tokenizer, all 1,319).
Decoded as independent rows, every row prefills those tokens again and every step reads their keys
and values once per row, which at batch 64 is most of the step's memory traffic. Here the prefix is
run once (batch 1) and its keys and values are kept once per layer; each row's cache holds only its
own suffix and what it generates.

Attention then splits in two (the "cascade" of FlashInfer and vLLM's prefix-shared decoding): the
rows' queries against the shared prefix, one GEMM per KV head that reads the prefix once for the
whole batch, and each row's queries against its own columns under its mask. The two partial softmaxes
are joined exactly through their maxima and sums, so the result is the attention over the
concatenation ``[prefix | row]``, up to the order of floating-point sums.

:func:`attend_with_prefix` is the maths; :func:`prefix_attention` its transformers attention-interface
wrapper (registered under :data:`ATTENTION_NAME`, reading the prefix from the ``shared_prefix``
keyword the model's forward passes down); :func:`common_prefix_length` decides how much is shared.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

ATTENTION_NAME = "lorasoup_shared_prefix"


@dataclass(eq=False)
class SharedPrefix:
    """The keys and values of ``tokens`` at positions ``0..P-1``, one ``(kv_heads, P, head_dim)``
    pair per layer, shared by every row of a batch."""

    tokens: tuple[int, ...]
    keys: list[Tensor]
    values: list[Tensor]

    @property
    def length(self) -> int:
        return len(self.tokens)


def common_prefix_length(rows: Sequence[Sequence[int]]) -> int:
    """Length of the longest token prefix every row shares, leaving each row at least one token of
    its own (the token whose logits start its continuation)."""
    if not rows:
        return 0
    # the prefix all rows share is the one the lexicographically smallest and largest share
    ordered = [list(row) for row in rows]
    low, high = min(ordered), max(ordered)
    common = next(
        (i for i, (a, b) in enumerate(zip(low, high, strict=False)) if a != b), min(len(low), len(high))
    )
    return max(min(common, min(len(row) for row in rows) - 1), 0)


def attend_with_prefix(
    query: Tensor,
    prefix_keys: Tensor,
    prefix_values: Tensor,
    keys: Tensor,
    values: Tensor,
    mask: Tensor,
    scaling: float,
) -> Tensor:
    """Softmax attention of each row's queries over ``[shared prefix | the row's own columns]``.

    ``query (B, H, T, d)``; ``prefix_keys``, ``prefix_values (Hkv, P, d)``, seen by every query;
    ``keys``, ``values (B, Hkv, W, d)``, the rows' own columns, under the additive ``mask (B, 1, T, W)``
    (0 where a query may look, a large negative number elsewhere). ``H`` is a multiple of ``Hkv``: head
    ``h`` reads KV head ``h // (H / Hkv)``, as transformers' ``repeat_kv``. Returns ``(B, T, H, d)``,
    the layout transformers' attention functions return.

    Scores and the softmax are in float32 (float64 for float64 inputs); the two weighted sums of
    values run in the inputs' dtype on unnormalised weights in ``(0, 1]``, and are joined and divided
    by the softmax's denominator in float32. The prefix part stays in its per-KV-head layout
    throughout, so its large ``(Hkv, B·g·T, P)`` scores are never transposed or copied.
    """
    batch, heads, steps, dim = query.shape
    kv_heads, shared, width = prefix_keys.shape[0], prefix_keys.shape[1], keys.shape[2]
    group = heads // kv_heads
    exact = torch.promote_types(query.dtype, torch.float32)  # float32, or float64 for float64 inputs
    grouped = (query * scaling).reshape(batch, kv_heads, group * steps, dim)  # a KV head's heads together
    own = (grouped @ keys.transpose(-1, -2)).view(batch, kv_heads, group, steps, width)
    own = torch.add(own, mask[:, :, None].to(exact))  # (B, Hkv, g, T, W), in float32: the add promotes
    # all rows' queries of one KV head as one tall matrix: the prefix is read once for the batch
    tall = grouped.transpose(0, 1).reshape(kv_heads, batch * group * steps, dim)
    common = (tall @ prefix_keys.transpose(-1, -2)).view(kv_heads, batch, group, steps, shared)
    top = torch.maximum(own.amax(-1), common.amax(-1).transpose(0, 1))  # (B, Hkv, g, T) float32
    own = own.sub_(top[..., None]).exp_()
    common = torch.sub(common, top.transpose(0, 1)[..., None]).exp_()  # (Hkv, B, g, T, P) float32
    total = own.sum(-1) + common.sum(-1).transpose(0, 1)  # (B, Hkv, g, T)
    own = own.to(values.dtype).view(batch, kv_heads, group * steps, width)
    common = common.to(prefix_values.dtype).view(kv_heads, batch * group * steps, shared)
    out = (own @ values).to(exact)  # (B, Hkv, g·T, d)
    out += (common @ prefix_values).view(kv_heads, batch, group * steps, dim).transpose(0, 1)
    out /= total.view(batch, kv_heads, group * steps, 1)
    return out.view(batch, heads, steps, dim).transpose(1, 2).to(query.dtype)


def prefix_attention(
    module: Any,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attention_mask: Tensor | None,
    *,
    shared_prefix: SharedPrefix | None = None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs: Any,
) -> tuple[Tensor, None]:
    """transformers' attention-function signature around :func:`attend_with_prefix`.

    ``key``/``value`` are what the cache returned for the rows' own columns; the prefix of the layer
    (``module.layer_idx``) comes from ``shared_prefix``. Refuses what it does not compute (dropout,
    soft-capping, attention sinks) rather than silently ignoring it.
    """
    if shared_prefix is None or attention_mask is None:
        raise ValueError("shared-prefix attention needs the shared_prefix keyword and a 4D mask")
    if dropout or kwargs.get("softcap") is not None or kwargs.get("s_aux") is not None:
        raise ValueError("shared-prefix attention computes plain softmax attention without dropout")
    layer = module.layer_idx
    scale = scaling if scaling is not None else 1.0 / math.sqrt(query.shape[-1])
    out = attend_with_prefix(
        query,
        shared_prefix.keys[layer],
        shared_prefix.values[layer],
        key,
        value,
        attention_mask[..., : key.shape[-2]],
        scale,
    )
    return out, None


@functools.cache
def register() -> str:
    """Make :func:`prefix_attention` selectable as ``config._attn_implementation`` (once per process)."""
    from transformers import AttentionInterface

    AttentionInterface.register(ATTENTION_NAME, prefix_attention)
    return ATTENTION_NAME
