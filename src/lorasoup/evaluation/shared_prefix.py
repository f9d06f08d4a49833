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


class PrefixNotReached(ValueError):
    """The model's attention cannot take the shared prefix: its forward does not pass keyword
    arguments down to its attention, or it needs what this attention does not compute (dropout,
    soft-capping, sinks). The caller decodes without sharing instead."""


@dataclass(eq=False)
class SharedPrefix:
    """The keys and values of ``tokens`` at positions ``0..P-1``, one ``(kv_heads, P, head_dim)``
    pair per layer, shared by every row of a batch."""

    tokens: tuple[int, ...]
    keys: list[Tensor]
    values: list[Tensor]
    fused: bool = False  # decoding steps on CUDA through attend_decode_fused where it serves them

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


PREFIX_CHUNK = 256
"""Prefix keys per program of the fused kernel's first pass (its grid: KV heads × chunks × row tiles)."""


def fused_decode_supported(query: Tensor, prefix_keys: Tensor) -> bool:
    """Whether :func:`attend_decode_fused` serves these inputs: one query per row, a head size that
    ``tl.dot`` takes (a power of two from 16 to 256), Triton importable."""
    import importlib.util

    dim = query.shape[-1]
    return (
        query.shape[2] == 1
        and 16 <= dim <= 256
        and dim & (dim - 1) == 0
        and prefix_keys.shape[-1] == dim
        and importlib.util.find_spec("triton") is not None
    )


def attend_decode_fused(
    query: Tensor,
    prefix_keys: Tensor,
    prefix_values: Tensor,
    keys: Tensor,
    values: Tensor,
    mask: Tensor,
    scaling: float,
) -> Tensor:
    """:func:`attend_with_prefix` for one decoding step (``T = 1``) in two Triton kernels
    (``_prefix_kernels``): the prefix in chunks, each read once for every query of its KV head
    (``tl.dot``), then each query's own columns and the join. Same shapes and result, up to the
    order of floating-point sums; float32 inputs multiply in IEEE float32 (no TF32).
    """
    from lorasoup.evaluation import _prefix_kernels as kernels

    batch, heads, _, dim = query.shape
    kv_heads, shared, width = prefix_keys.shape[0], prefix_keys.shape[1], keys.shape[2]
    group, rows = heads // kv_heads, batch * heads // kv_heads
    chunks = -(-shared // PREFIX_CHUNK)
    q = query[:, :, 0]  # (B, H, d): a view, head dimension contiguous
    prefix_keys, prefix_values = prefix_keys.contiguous(), prefix_values.contiguous()
    if q.stride(-1) != 1 or keys.stride(-1) != 1 or values.stride(-1) != 1 or mask.stride(-1) != 1:
        raise ValueError("attend_decode_fused needs the head dimension and mask columns contiguous")
    partial_max = torch.empty(kv_heads, chunks, rows, dtype=torch.float32, device=query.device)
    partial_sum = torch.empty_like(partial_max)
    partial_acc = torch.empty(kv_heads, chunks, rows, dim, dtype=torch.float32, device=query.device)
    tile = min(64, max(16, 1 << (rows - 1).bit_length()))
    kernels.prefix_partials[(kv_heads, chunks, -(-rows // tile))](
        q, prefix_keys, prefix_values, partial_max, partial_sum, partial_acc,
        rows, group, shared, chunks, scaling,
        q.stride(0), q.stride(1), prefix_keys.stride(0), prefix_keys.stride(1),
        prefix_values.stride(0), prefix_values.stride(1),
        HEAD_DIM=dim, BLOCK_M=tile, BLOCK_N=64, CHUNK=PREFIX_CHUNK, IEEE=query.dtype == torch.float32,
    )  # fmt: skip
    out = torch.empty(batch, 1, heads, dim, dtype=query.dtype, device=query.device)
    kernels.own_and_combine[(batch, heads)](
        q, keys, values, mask, partial_max, partial_sum, partial_acc, out,
        group, width, rows, chunks, scaling,
        q.stride(0), q.stride(1), keys.stride(0), keys.stride(1), keys.stride(2),
        values.stride(0), values.stride(1), values.stride(2), mask.stride(0),
        out.stride(0), out.stride(2),
        HEAD_DIM=dim, BLOCK_W=64, BLOCKS_W=-(-width // 64), BLOCK_C=max(2, 1 << (chunks - 1).bit_length()),
    )  # fmt: skip
    return out


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
        raise PrefixNotReached("shared-prefix attention needs the shared_prefix keyword and a 4D mask")
    if dropout or kwargs.get("softcap") is not None or kwargs.get("s_aux") is not None:
        raise PrefixNotReached("shared-prefix attention computes plain softmax attention without dropout")
    layer = module.layer_idx
    scale = scaling if scaling is not None else 1.0 / math.sqrt(query.shape[-1])
    prefix_keys, prefix_values = shared_prefix.keys[layer], shared_prefix.values[layer]
    mask = attention_mask[..., : key.shape[-2]]
    fused = shared_prefix.fused and query.is_cuda and fused_decode_supported(query, prefix_keys)
    attend = attend_decode_fused if fused else attend_with_prefix
    return attend(query, prefix_keys, prefix_values, key, value, mask, scale), None


@functools.cache
def register() -> str:
    """Make :func:`prefix_attention` selectable as ``config._attn_implementation`` (once per process)."""
    from transformers import AttentionInterface

    AttentionInterface.register(ATTENTION_NAME, prefix_attention)
    return ATTENTION_NAME
