"""Triton kernels of :func:`lorasoup.evaluation.shared_prefix.attend_decode_fused` (imported on first
use: it imports Triton). Module-level ``@triton.jit`` functions, so Triton's interpreter runs them on a
CPU too (that is how their tests run where there is no GPU).

One decoding step (one query per row) of attention over ``[shared prefix | the row's own columns]``,
flash-decoding style:

* :func:`prefix_partials`, grid ``(KV heads, prefix chunks, row tiles)``: every query row of one KV
  head (``B · group`` of them) against one chunk of the prefix's keys and values, one ``tl.dot`` per
  block, so a chunk is read once for the whole batch. It leaves the chunk's softmax maximum, sum and
  weighted values per query row.
* :func:`own_and_combine`, grid ``(B, heads)``: one query against its row's own columns under the
  additive mask (online softmax), then joined with the prefix chunks' partials into the output.
"""

import triton
import triton.language as tl


@triton.jit
def prefix_partials(
    Q, K, V, M_OUT, L_OUT, ACC_OUT,
    rows, group, prefix_len, chunks, scale,
    stride_qb, stride_qh, stride_kh, stride_kp, stride_vh, stride_vp,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CHUNK: tl.constexpr,
    IEEE: tl.constexpr,
):  # fmt: skip
    kv_head = tl.program_id(0)
    chunk = tl.program_id(1)
    r = tl.program_id(2) * BLOCK_M + tl.arange(0, BLOCK_M)  # query rows of this KV head: b·group + j
    live = r < rows
    dims = tl.arange(0, HEAD_DIM)
    head = kv_head * group + r % group
    q_at = Q + (r // group)[:, None] * stride_qb + head[:, None] * stride_qh + dims[None, :]
    q = tl.load(q_at, mask=live[:, None], other=0.0)
    m_i = tl.zeros([BLOCK_M], dtype=tl.float32) - float("inf")
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    for start in range(0, CHUNK, BLOCK_N):
        n = chunk * CHUNK + start + tl.arange(0, BLOCK_N)
        inside = n < prefix_len
        k = tl.load(
            K + kv_head * stride_kh + n[:, None] * stride_kp + dims[None, :], mask=inside[:, None], other=0.0
        )
        if IEEE:  # noqa: SIM108 (a compile-time choice: Triton reads the constexpr branch only)
            s = tl.dot(q, tl.trans(k), input_precision="ieee")
        else:
            s = tl.dot(q, tl.trans(k))
        s = tl.where(inside[None, :], s * scale, float("-inf"))
        # a block past the prefix's end leaves m_i as it was: exp(-inf - m) is 0
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp(m_i - m_new)
        p = tl.exp(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(
            V + kv_head * stride_vh + n[:, None] * stride_vp + dims[None, :], mask=inside[:, None], other=0.0
        )
        if IEEE:
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision="ieee")
        else:
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new
    slot = (kv_head * chunks + chunk) * rows + r
    tl.store(M_OUT + slot, m_i, mask=live)
    tl.store(L_OUT + slot, l_i, mask=live)
    tl.store(ACC_OUT + slot[:, None] * HEAD_DIM + dims[None, :], acc, mask=live[:, None])


@triton.jit
def own_and_combine(
    Q, K, V, MASK, M_PART, L_PART, ACC_PART, OUT,
    group, width, rows, chunks, scale,
    stride_qb, stride_qh, stride_kb, stride_kh, stride_kw, stride_vb, stride_vh, stride_vw, stride_mb,
    stride_ob, stride_oh,
    HEAD_DIM: tl.constexpr, BLOCK_W: tl.constexpr, BLOCKS_W: tl.constexpr, BLOCK_C: tl.constexpr,
):  # fmt: skip
    b = tl.program_id(0).to(tl.int64)  # b · stride_kb passes 2³¹ on long caches at batch 128
    head = tl.program_id(1)
    kv_head = head // group
    dims = tl.arange(0, HEAD_DIM)
    q = tl.load(Q + b * stride_qb + head * stride_qh + dims).to(tl.float32)
    m_i = -float("inf")
    l_i = 0.0
    acc = tl.zeros([HEAD_DIM], dtype=tl.float32)
    # a constant trip count (one compilation per attention window, which the step fixes anyway):
    # Triton's interpreter cannot loop to a runtime bound under NumPy 2
    for block in range(BLOCKS_W):
        w = block * BLOCK_W + tl.arange(0, BLOCK_W)
        inside = w < width
        k_at = K + b * stride_kb + kv_head * stride_kh + w[:, None] * stride_kw + dims[None, :]
        k = tl.load(k_at, mask=inside[:, None], other=0.0).to(tl.float32)
        bias = tl.load(MASK + b * stride_mb + w, mask=inside, other=0.0).to(tl.float32)
        s = tl.where(inside, tl.sum(k * q[None, :], 1) * scale + bias, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 0))
        alpha = tl.exp(m_i - m_new)
        p = tl.exp(s - m_new)
        l_i = l_i * alpha + tl.sum(p, 0)
        v_at = V + b * stride_vb + kv_head * stride_vh + w[:, None] * stride_vw + dims[None, :]
        v = tl.load(v_at, mask=inside[:, None], other=0.0).to(tl.float32)
        acc = acc * alpha + tl.sum(p[:, None] * v, 0)
        m_i = m_new
    # the prefix chunks' partials of this query row
    c = tl.arange(0, BLOCK_C)
    present = c < chunks
    slot = (kv_head * chunks + c) * rows + b * group + head % group
    m_c = tl.load(M_PART + slot, mask=present, other=-float("inf"))
    l_c = tl.load(L_PART + slot, mask=present, other=0.0)
    acc_c = tl.load(ACC_PART + slot[:, None] * HEAD_DIM + dims[None, :], mask=present[:, None], other=0.0)
    top = tl.maximum(m_i, tl.max(m_c, 0))
    own_weight = tl.exp(m_i - top)
    chunk_weights = tl.exp(m_c - top)
    total = l_i * own_weight + tl.sum(l_c * chunk_weights, 0)
    out = (acc * own_weight + tl.sum(acc_c * chunk_weights[:, None], 0)) / total
    tl.store(OUT + b * stride_ob + head * stride_oh + dims, out.to(OUT.dtype.element_ty))
