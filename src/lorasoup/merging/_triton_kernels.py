"""The Triton kernels of :mod:`lorasoup.merging.fused` (imported only when one runs: it imports Triton).

Module-level ``@triton.jit`` functions, so that Triton's interpreter (``TRITON_INTERPRET=1``) runs
them on a CPU too, which is how their tests run where there is no GPU.
"""

import triton
import triton.language as tl


@triton.jit
def count_and_collect(X, n, first, LOW, HIGH, KEYS, COUNTERS, capacity, BLOCK: tl.constexpr):
    offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inside = offsets < n
    magnitude = tl.abs(tl.load(X + offsets, mask=inside, other=0.0))
    low = tl.load(LOW)
    high = tl.load(HIGH)
    above = inside & (magnitude > high)
    tl.atomic_add(COUNTERS, tl.sum(above.to(tl.int32), axis=0))
    within = inside & (magnitude >= low) & (magnitude <= high)
    flags = within.to(tl.int32)
    start = tl.atomic_add(COUNTERS + 1, tl.sum(flags, axis=0))  # this program's slots
    slots = start + tl.cumsum(flags, axis=0) - 1
    # rowwise.candidate_keys: the magnitude's bits, then 2^32 - 1 - the row-major position, all
    # in int64 (a literal 2^32 - 1 would be typed uint32)
    low_mask = (tl.full([BLOCK], 1, tl.int64) << 32) - 1
    bits = magnitude.to(tl.int32, bitcast=True).to(tl.int64)
    key = (bits << 32) | (low_mask - (first + offsets))
    tl.store(KEYS + slots, key, mask=within & (slots < capacity))


@triton.jit
def mix32(x):
    # rowwise.mix32 (lowbias32) in uint32 arithmetic, which wraps as the torch version's masks do
    x = x ^ (x >> 16)
    x = x * 0x7FEB352D
    x = x ^ (x >> 15)
    x = x * 0x846CA68B
    return x ^ (x >> 16)


@triton.jit
def task_block(
    X, THRESH, LAST, WEIGHT, KEYS, keep_below, k, stride_k, offsets, first, inside,
    TRIM: tl.constexpr, DROP: tl.constexpr,
):  # fmt: skip
    # task k's entries at `offsets`: trimmed by its cut (rowwise.trim_) or dropped by DARE's hash
    # (rowwise.dare_keep), then weighted
    x = tl.load(X + k * stride_k + offsets, mask=inside, other=0.0)
    if TRIM:
        magnitude = tl.abs(x)
        threshold = tl.load(THRESH + k)
        late = (first + offsets) > tl.load(LAST + k)
        x = tl.where((magnitude < threshold) | ((magnitude == threshold) & late), 0.0, x)
    if DROP:
        key = tl.load(KEYS + k).to(tl.uint32)
        hashed = mix32(mix32((first + offsets).to(tl.uint32)) ^ key)
        x = tl.where(hashed.to(tl.int64) < keep_below, x, 0.0)
    return x * tl.load(WEIGHT + k)


@triton.jit
def merge_block(
    X, THRESH, LAST, WEIGHT, KEYS, keep_below, OUT, n, first, stride_k,
    K: tl.constexpr, TRIM: tl.constexpr, DROP: tl.constexpr, CONSENSUS: tl.constexpr,
    FREQUENCY: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inside = offsets < n
    result = tl.zeros([BLOCK], dtype=tl.float32)
    if CONSENSUS:
        score = tl.zeros([BLOCK], dtype=tl.float32)
        for k in tl.static_range(K):
            x = task_block(
                X, THRESH, LAST, WEIGHT, KEYS, keep_below, k, stride_k, offsets, first, inside, TRIM, DROP
            )
            if FREQUENCY:
                score += tl.where(x > 0, 1.0, tl.where(x < 0, -1.0, 0.0))
            else:
                score += x
        positive = score >= 0
        agreeing = tl.zeros([BLOCK], dtype=tl.float32)
        for k in tl.static_range(K):  # read again: K blocks do not fit in registers or cache
            x = task_block(
                X, THRESH, LAST, WEIGHT, KEYS, keep_below, k, stride_k, offsets, first, inside, TRIM, DROP
            )
            agrees = tl.where(positive, x > 0, x < 0)
            result += tl.where(agrees, x, 0.0)
            agreeing += agrees.to(tl.float32)
        result = tl.math.div_rn(result, tl.maximum(agreeing, 1.0))  # IEEE division, as torch
    else:
        for k in tl.static_range(K):
            result += task_block(
                X, THRESH, LAST, WEIGHT, KEYS, keep_below, k, stride_k, offsets, first, inside, TRIM, DROP
            )
    tl.store(OUT + offsets, result, mask=inside)
