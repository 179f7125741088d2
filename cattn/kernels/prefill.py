"""Prefill and extend: each sequence's last ``q_len`` tokens attend to all its ``kv_len`` cached tokens.

Grid: (query blocks, KV heads, sequences). A program's ``BLOCK_R`` rows are
``BLOCK_R // GROUP`` consecutive query tokens times the ``GROUP`` query heads that
share one KV head. Keys every row may see run unmasked; the diagonal band (causal), the
partial last tile and the lower edge of a sliding window run masked.

``PRE_ROTATED`` programs read Q already rotated and joined by `rotate_q_kernel` (a
workspace ``[total_q, num_q_heads, 2*HALF_PAD + PASS_PAD]``): Q loaded from memory can feed
the tensor cores from shared memory instead of registers, which is what lets 256-wide heads
fit the register file.
"""
import triton
import triton.language as tl

from cattn.kernels.attend import attend_kv_range, load_rotated_q


@triton.jit
def paged_prefill_kernel(
    q_ptr, k_cache, v_cache, out_ptr, block_table, kv_lens, cu_seqlens_q, cos_sin_ptr, long_after, table_set_stride,
    score_scale, cap_log2, window,
    stride_qt, stride_qh, stride_ot, stride_oh, stride_kp, stride_kt, stride_kh, stride_vp, stride_vt, stride_vh,
    stride_bt,
    GROUP: tl.constexpr, PAGE_SIZE: tl.constexpr, HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, ROT: tl.constexpr,
    HALF_PAD: tl.constexpr, PASS_PAD: tl.constexpr, GPTJ: tl.constexpr, CAUSAL: tl.constexpr,
    WINDOWED: tl.constexpr, SOFTCAP: tl.constexpr, PRE_ROTATED: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    block, kv_head, seq = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    BLOCK_TOKENS: tl.constexpr = BLOCK_R // GROUP
    q_start = tl.load(cu_seqlens_q + seq)
    q_len = tl.load(cu_seqlens_q + seq + 1) - q_start
    first_token = block * BLOCK_TOKENS
    if first_token >= q_len:
        return
    kv_len = tl.load(kv_lens + seq)
    # longrope: sequences past the switch length read the long factors' table set
    cos_sin_set = cos_sin_ptr + (kv_len > long_after).to(tl.int64) * table_set_stride

    rows = tl.arange(0, BLOCK_R)
    token = first_token + rows // GROUP
    head = kv_head * GROUP + rows % GROUP
    row_ok = (rows < BLOCK_TOKENS * GROUP) & (token < q_len)
    q_pos = kv_len - q_len + token
    q_rows = q_ptr + (q_start + token).to(tl.int64) * stride_qt + head * stride_qh
    if PRE_ROTATED:
        joined = tl.arange(0, 2 * HALF_PAD)
        q_rot = tl.load(q_rows[:, None] + joined[None, :], mask=row_ok[:, None], other=0.0)
        rest = 2 * HALF_PAD + tl.arange(0, PASS_PAD)
        q_rest = tl.load(q_rows[:, None] + rest[None, :], mask=row_ok[:, None], other=0.0)
    else:
        q_rot, q_rest = load_rotated_q(q_rows, row_ok, q_pos, cos_sin_set, HEAD_DIM, ROT, HALF_PAD, PASS_PAD, GPTJ)

    acc = tl.zeros([BLOCK_R, D_PAD], dtype=tl.float32)
    m_i = tl.full([BLOCK_R], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_R], dtype=tl.float32)
    first_pos = kv_len - q_len + first_token
    last_pos = kv_len - q_len + tl.minimum(first_token + BLOCK_TOKENS, q_len) - 1
    if CAUSAL:
        # keys <= the block's first position are visible to every row; the band up to its last is not
        full_end = (first_pos + 1) // BLOCK_N * BLOCK_N
        kv_end = last_pos + 1
    else:
        full_end = kv_len // BLOCK_N * BLOCK_N
        kv_end = kv_len
    # [lo, full_lo) masked (the window's lower edge), [full_lo, full_hi) unmasked, [full_hi, kv_end) masked
    lo = 0
    full_lo = 0
    if WINDOWED:
        lo = tl.maximum(first_pos - window + 1, 0) // BLOCK_N * BLOCK_N
        full_lo = tl.minimum(tl.maximum(tl.cdiv(tl.maximum(last_pos - window + 1, 0), BLOCK_N) * BLOCK_N, lo), kv_end)
    full_hi = tl.minimum(tl.maximum(full_end, full_lo), kv_end)
    bt_row = block_table + seq.to(tl.int64) * stride_bt
    k_off, v_off = kv_head * stride_kh, kv_head * stride_vh
    if WINDOWED:
        acc, m_i, l_i = attend_kv_range(
            acc, m_i, l_i, q_rot, q_rest, q_pos, k_cache, v_cache, bt_row, kv_len, k_off, v_off,
            stride_kp, stride_kt, stride_vp, stride_vt, cos_sin_set, score_scale, cap_log2, window, lo, full_lo,
            PAGE_SIZE, BLOCK_N, HEAD_DIM, D_PAD, ROT, HALF_PAD, PASS_PAD, GPTJ,
            MASKED=True, CAUSAL=CAUSAL, WINDOWED=WINDOWED, SOFTCAP=SOFTCAP, K_IN_DTYPE=PRE_ROTATED,
            DOT_PRECISION=DOT_PRECISION)
    acc, m_i, l_i = attend_kv_range(
        acc, m_i, l_i, q_rot, q_rest, q_pos, k_cache, v_cache, bt_row, kv_len, k_off, v_off,
        stride_kp, stride_kt, stride_vp, stride_vt, cos_sin_set, score_scale, cap_log2, window, full_lo, full_hi,
        PAGE_SIZE, BLOCK_N, HEAD_DIM, D_PAD, ROT, HALF_PAD, PASS_PAD, GPTJ,
        MASKED=False, CAUSAL=CAUSAL, WINDOWED=WINDOWED, SOFTCAP=SOFTCAP, K_IN_DTYPE=PRE_ROTATED,
        DOT_PRECISION=DOT_PRECISION)
    acc, m_i, l_i = attend_kv_range(
        acc, m_i, l_i, q_rot, q_rest, q_pos, k_cache, v_cache, bt_row, kv_len, k_off, v_off,
        stride_kp, stride_kt, stride_vp, stride_vt, cos_sin_set, score_scale, cap_log2, window, full_hi, kv_end,
        PAGE_SIZE, BLOCK_N, HEAD_DIM, D_PAD, ROT, HALF_PAD, PASS_PAD, GPTJ,
        MASKED=True, CAUSAL=CAUSAL, WINDOWED=WINDOWED, SOFTCAP=SOFTCAP, K_IN_DTYPE=PRE_ROTATED,
        DOT_PRECISION=DOT_PRECISION)

    out = acc / l_i[:, None]
    d = tl.arange(0, D_PAD)
    out_rows = out_ptr + (q_start + token).to(tl.int64) * stride_ot + head * stride_oh
    tl.store(out_rows[:, None] + d[None, :], out.to(out_ptr.dtype.element_ty),
             mask=row_ok[:, None] & (d[None, :] < HEAD_DIM))


@triton.jit
def rotate_q_kernel(
    q_ptr, q_rot_ptr, kv_lens, cu_seqlens_q, cos_sin_ptr, long_after, table_set_stride, stride_qt, stride_qh,
    NUM_HEADS: tl.constexpr, HEADS_PAD: tl.constexpr, HEAD_DIM: tl.constexpr, ROT: tl.constexpr,
    HALF_PAD: tl.constexpr, PASS_PAD: tl.constexpr, GPTJ: tl.constexpr, BLOCK_T: tl.constexpr,
):
    """Rotate each query token at its position; store ``[rotated pairs joined | rest]`` (zero padded) into
    ``q_rot_ptr [total_q, NUM_HEADS, 2*HALF_PAD + PASS_PAD]``. Grid: (token blocks, sequences)."""
    block, seq = tl.program_id(0), tl.program_id(1)
    q_start = tl.load(cu_seqlens_q + seq)
    q_len = tl.load(cu_seqlens_q + seq + 1) - q_start
    if block * BLOCK_T >= q_len:
        return
    kv_len = tl.load(kv_lens + seq)
    cos_sin_set = cos_sin_ptr + (kv_len > long_after).to(tl.int64) * table_set_stride
    rows = tl.arange(0, BLOCK_T * HEADS_PAD)
    token = block * BLOCK_T + rows // HEADS_PAD
    head = rows % HEADS_PAD
    row_ok = (token < q_len) & (head < NUM_HEADS)
    q_rows = q_ptr + (q_start + token).to(tl.int64) * stride_qt + head * stride_qh
    q_rot, q_rest = load_rotated_q(q_rows, row_ok, kv_len - q_len + token, cos_sin_set, HEAD_DIM, ROT, HALF_PAD,
                                   PASS_PAD, GPTJ)
    width: tl.constexpr = 2 * HALF_PAD + PASS_PAD
    out_rows = q_rot_ptr + ((q_start + token).to(tl.int64) * NUM_HEADS + head) * width
    joined = tl.arange(0, 2 * HALF_PAD)
    tl.store(out_rows[:, None] + joined[None, :], q_rot, mask=row_ok[:, None])
    rest = 2 * HALF_PAD + tl.arange(0, PASS_PAD)
    tl.store(out_rows[:, None] + rest[None, :], q_rest, mask=row_ok[:, None])
