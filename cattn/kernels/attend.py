"""The inner loop shared by prefill/extend and decode: online softmax over a range of paged keys.

Q arrives rotated and joined (see `cattn.kernels.rope`); each K tile is gathered through
the block table, rotated in registers from the cos/sin table at its own positions (token
i of the cache has position i), joined the same way and consumed by one dot. The rows of
a program are the query heads of ONE KV head (times some tokens), so every K/V tile
loaded here serves the whole GQA group.
"""
import triton
import triton.language as tl

from cattn.kernels.rope import load_pairs, rotate_joined, table_cos_sin

LOG2E = tl.constexpr(1.4426950408889634)


@triton.jit
def softcapped(scores, score_scale, cap_log2):
    """``cap * tanh(scores * sm_scale / cap)`` in base-2 units; tanh from exp2 (no libdevice call)."""
    x = scores * score_scale
    e = tl.math.exp2(x * (2.0 * LOG2E))
    return (1.0 - 2.0 / (e + 1.0)) * cap_log2


@triton.jit
def attend_kv_range(
    acc, m_i, l_i, q_rot, q_rest, q_pos,
    k_cache, v_cache, block_table_row, kv_len, k_head_offset, v_head_offset,
    stride_kp, stride_kt, stride_vp, stride_vt,
    cos_sin_set, score_scale, cap_log2, window, lo, hi,
    PAGE_SIZE: tl.constexpr, BLOCK_N: tl.constexpr,
    HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, ROT: tl.constexpr, HALF_PAD: tl.constexpr,
    PASS_PAD: tl.constexpr, GPTJ: tl.constexpr, MASKED: tl.constexpr, CAUSAL: tl.constexpr,
    WINDOWED: tl.constexpr, SOFTCAP: tl.constexpr, K_IN_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """Fold keys ``[lo, hi)`` into ``(acc, m_i, l_i)``; ``MASKED`` tiles check ``kv_len``, causality and
    the sliding window (a key is visible when ``q_pos - window < key <= q_pos``).

    acc: ``[ROWS, D_PAD]`` fp32 unnormalised output; m_i, l_i: ``[ROWS]`` fp32 running max (base 2)
    and denominator; q_rot ``[ROWS, 2*HALF_PAD]`` rotated, joined query pairs and q_rest
    ``[ROWS, PASS_PAD]`` the unrotated rest, in the dot dtype; q_pos ``[ROWS]`` int32 positions.
    score_scale: ``sm_scale * log2(e)``, or ``sm_scale / softcap`` with ``SOFTCAP`` (then
    ``cap_log2 = softcap * log2(e)``). ``K_IN_DTYPE`` rotates K in its own dtype, as HF does (each
    product rounded), instead of in fp32: 256-wide prefill tiles need the registers.
    """
    dtype = v_cache.dtype.element_ty
    HALF: tl.constexpr = ROT // 2
    PASS: tl.constexpr = HEAD_DIM - ROT
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
            k1, k2 = load_pairs(k_rows, in_len, HALF, HALF_PAD, GPTJ, K_IN_DTYPE)
            cos, sin = table_cos_sin(cos_sin_set, keys, ROT, HALF_PAD, K_IN_DTYPE)
            k_rot = rotate_joined(k1, k2, cos, sin, dtype)
            scores = tl.dot(q_rot, tl.trans(k_rot), scores, input_precision=DOT_PRECISION)
        if PASS > 0:
            k_rest = tl.load(k_rows[:, None] + rest[None, :], mask=in_len[:, None] & (rest[None, :] < HEAD_DIM),
                             other=0.0)
            scores = tl.dot(q_rest, tl.trans(k_rest), scores, input_precision=DOT_PRECISION)
        if SOFTCAP:
            scores = softcapped(scores, score_scale, cap_log2)
        else:
            scores = scores * score_scale
        if MASKED:
            visible = in_len[None, :]
            if CAUSAL:
                visible = visible & (keys[None, :] <= q_pos[:, None])
            if WINDOWED:
                visible = visible & (keys[None, :] > q_pos[:, None] - window)
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
    q_rows, row_ok, q_pos, cos_sin_set,
    HEAD_DIM: tl.constexpr, ROT: tl.constexpr, HALF_PAD: tl.constexpr, PASS_PAD: tl.constexpr,
    GPTJ: tl.constexpr,
):
    """Load query rows (``q_rows``: pointer per row to its head's dim 0) and rotate them at ``q_pos``.

    Returns q_rot ``[ROWS, 2*HALF_PAD]`` (rotated pairs joined, as K is) and q_rest ``[ROWS, PASS_PAD]``,
    in q's dtype (zeros where absent).
    """
    dtype = q_rows.dtype.element_ty
    HALF: tl.constexpr = ROT // 2
    rest = ROT + tl.arange(0, PASS_PAD)
    q1, q2 = load_pairs(q_rows, row_ok, HALF, HALF_PAD, GPTJ)
    cos, sin = table_cos_sin(cos_sin_set, q_pos, ROT, HALF_PAD)
    q_rot = rotate_joined(q1, q2, cos, sin, dtype)
    q_rest = tl.load(q_rows[:, None] + rest[None, :], mask=row_ok[:, None] & (rest[None, :] < HEAD_DIM),
                     other=0.0)
    return q_rot, q_rest
