"""The inner loop shared by prefill/extend and decode: online softmax over a range of paged keys.

Q arrives rotated and split into its parts (see `cattn.kernels.rope`); each K tile is
gathered through the block table, rotated in registers at its own positions (token i
of the cache has position i) and consumed by the same rows of Q. The rows of a program
are the query heads of ONE KV head (times some tokens), so every K/V tile loaded here
serves the whole GQA group.
"""
import triton
import triton.language as tl

from cattn.kernels.rope import pair_dims, rope_cos_sin, rotate


@triton.jit
def attend_kv_range(
    acc, m_i, l_i, q1, q2, q3, q_pos,
    k_cache, v_cache, block_table_row, kv_len, k_head_offset, v_head_offset,
    stride_kp, stride_kt, stride_vp, stride_vt,
    inv_freq_ptr, rope_scaling, qk_scale_log2, lo, hi,
    PAGE_SIZE: tl.constexpr, BLOCK_N: tl.constexpr,
    HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, ROT: tl.constexpr, HALF_PAD: tl.constexpr,
    PASS_PAD: tl.constexpr, GPTJ: tl.constexpr, MASKED: tl.constexpr, CAUSAL: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """Fold keys ``[lo, hi)`` into ``(acc, m_i, l_i)``; ``MASKED`` tiles check ``kv_len`` and causality.

    acc: ``[ROWS, D_PAD]`` fp32 unnormalised output; m_i, l_i: ``[ROWS]`` fp32 running max (base 2)
    and denominator; q1, q2: ``[ROWS, HALF_PAD]`` rotated query pairs, q3 ``[ROWS, PASS_PAD]`` the
    unrotated rest, in the dot dtype; q_pos ``[ROWS]`` int32 query positions.
    """
    dtype = v_cache.dtype.element_ty
    HALF: tl.constexpr = ROT // 2
    PASS: tl.constexpr = HEAD_DIM - ROT
    first, second, pair_ok = pair_dims(HALF_PAD, HALF, GPTJ)
    rest = ROT + tl.arange(0, PASS_PAD)
    d = tl.arange(0, D_PAD)
    for start in range(lo, hi, BLOCK_N):
        keys = start + tl.arange(0, BLOCK_N)
        in_len = keys < kv_len
        page = tl.load(block_table_row + keys // PAGE_SIZE, mask=in_len, other=0).to(tl.int64)
        k_rows = k_cache + page * stride_kp + (keys % PAGE_SIZE) * stride_kt + k_head_offset
        v_rows = v_cache + page * stride_vp + (keys % PAGE_SIZE) * stride_vt + v_head_offset
        scores = tl.zeros([q_pos.shape[0], BLOCK_N], dtype=tl.float32)
        if HALF > 0:
            row_ok = in_len[:, None] & pair_ok[None, :]
            k1 = tl.load(k_rows[:, None] + first[None, :], mask=row_ok, other=0.0).to(tl.float32)
            k2 = tl.load(k_rows[:, None] + second[None, :], mask=row_ok, other=0.0).to(tl.float32)
            cos, sin = rope_cos_sin(keys, inv_freq_ptr, rope_scaling, HALF, HALF_PAD)
            k1, k2 = rotate(k1, k2, cos, sin)
            scores = tl.dot(q1, tl.trans(k1.to(dtype)), scores, input_precision=DOT_PRECISION)
            scores = tl.dot(q2, tl.trans(k2.to(dtype)), scores, input_precision=DOT_PRECISION)
        if PASS > 0:
            k3 = tl.load(k_rows[:, None] + rest[None, :], mask=in_len[:, None] & (rest[None, :] < HEAD_DIM),
                         other=0.0)
            scores = tl.dot(q3, tl.trans(k3), scores, input_precision=DOT_PRECISION)
        scores = scores * qk_scale_log2
        if MASKED:
            visible = in_len[None, :]
            if CAUSAL:
                visible = visible & (keys[None, :] <= q_pos[:, None])
            scores = tl.where(visible, scores, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(scores, 1))
        # a row that has seen no visible key yet keeps m = -inf; subtract 0 instead to avoid inf - inf
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.math.exp2(scores - m_safe[:, None])
        alpha = tl.math.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_rows[:, None] + d[None, :], mask=in_len[:, None] & (d[None, :] < HEAD_DIM), other=0.0)
        acc = tl.dot(p.to(dtype), v, acc * alpha[:, None], input_precision=DOT_PRECISION)
        m_i = m_new
    return acc, m_i, l_i


@triton.jit
def load_rotated_q(
    q_rows, row_ok, q_pos, inv_freq_ptr, rope_scaling,
    HEAD_DIM: tl.constexpr, ROT: tl.constexpr, HALF_PAD: tl.constexpr, PASS_PAD: tl.constexpr,
    GPTJ: tl.constexpr,
):
    """Load query rows (``q_rows``: pointer per row to its head's dim 0) and rotate them at ``q_pos``.

    Returns q1, q2 ``[ROWS, HALF_PAD]`` and q3 ``[ROWS, PASS_PAD]`` in q's dtype (zeros where absent).
    """
    dtype = q_rows.dtype.element_ty
    HALF: tl.constexpr = ROT // 2
    first, second, pair_ok = pair_dims(HALF_PAD, HALF, GPTJ)
    rest = ROT + tl.arange(0, PASS_PAD)
    mask = row_ok[:, None] & pair_ok[None, :]
    q1 = tl.load(q_rows[:, None] + first[None, :], mask=mask, other=0.0).to(tl.float32)
    q2 = tl.load(q_rows[:, None] + second[None, :], mask=mask, other=0.0).to(tl.float32)
    if HALF > 0:
        cos, sin = rope_cos_sin(q_pos, inv_freq_ptr, rope_scaling, HALF, HALF_PAD)
        q1, q2 = rotate(q1, q2, cos, sin)
    q3 = tl.load(q_rows[:, None] + rest[None, :], mask=row_ok[:, None] & (rest[None, :] < HEAD_DIM), other=0.0)
    return q1.to(dtype), q2.to(dtype), q3
