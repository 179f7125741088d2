"""Prefill and extend: each sequence's last ``q_len`` tokens attend to all its ``kv_len`` cached tokens.

Grid: (query blocks, KV heads, sequences). A program's ``BLOCK_R`` rows are
``BLOCK_R // GROUP`` consecutive query tokens times the ``GROUP`` query heads that
share one KV head. Keys every row may see run unmasked first; the diagonal band
(causal) and the partial last tile run masked.
"""
import triton
import triton.language as tl

from cattn.kernels.attend import attend_kv_range, load_rotated_q


@triton.jit
def paged_prefill_kernel(
    q_ptr, k_cache, v_cache, out_ptr, block_table, kv_lens, cu_seqlens_q, inv_freq_ptr, rope_scaling, long_after,
    qk_scale_log2,
    stride_qt, stride_qh, stride_ot, stride_oh, stride_kp, stride_kt, stride_kh, stride_vp, stride_vt, stride_vh,
    stride_bt,
    GROUP: tl.constexpr, PAGE_SIZE: tl.constexpr, HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, ROT: tl.constexpr,
    HALF_PAD: tl.constexpr, PASS_PAD: tl.constexpr, GPTJ: tl.constexpr, CAUSAL: tl.constexpr,
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
    # longrope: sequences past the switch length use the long factors (row 1 of the table)
    inv_freq_ptr += (kv_len > long_after).to(tl.int32) * (ROT // 2)

    rows = tl.arange(0, BLOCK_R)
    token = first_token + rows // GROUP
    head = kv_head * GROUP + rows % GROUP
    row_ok = (rows < BLOCK_TOKENS * GROUP) & (token < q_len)
    q_pos = kv_len - q_len + token
    q_rows = q_ptr + (q_start + token).to(tl.int64) * stride_qt + head * stride_qh
    q1, q2, q3 = load_rotated_q(q_rows, row_ok, q_pos, inv_freq_ptr, rope_scaling, HEAD_DIM, ROT, HALF_PAD,
                                PASS_PAD, GPTJ)

    acc = tl.zeros([BLOCK_R, D_PAD], dtype=tl.float32)
    m_i = tl.full([BLOCK_R], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_R], dtype=tl.float32)
    last_token = tl.minimum(first_token + BLOCK_TOKENS, q_len) - 1
    if CAUSAL:
        # keys <= the block's first position are visible to every row; the band up to its last is not
        full_end = (kv_len - q_len + first_token + 1) // BLOCK_N * BLOCK_N
        kv_end = kv_len - q_len + last_token + 1
    else:
        full_end = kv_len // BLOCK_N * BLOCK_N
        kv_end = kv_len
    bt_row = block_table + seq.to(tl.int64) * stride_bt
    k_off, v_off = kv_head * stride_kh, kv_head * stride_vh
    acc, m_i, l_i = attend_kv_range(
        acc, m_i, l_i, q1, q2, q3, q_pos, k_cache, v_cache, bt_row, kv_len, k_off, v_off,
        stride_kp, stride_kt, stride_vp, stride_vt, inv_freq_ptr, rope_scaling, qk_scale_log2, 0, full_end,
        PAGE_SIZE, BLOCK_N, HEAD_DIM, D_PAD, ROT, HALF_PAD, PASS_PAD, GPTJ, False, CAUSAL, DOT_PRECISION)
    acc, m_i, l_i = attend_kv_range(
        acc, m_i, l_i, q1, q2, q3, q_pos, k_cache, v_cache, bt_row, kv_len, k_off, v_off,
        stride_kp, stride_kt, stride_vp, stride_vt, inv_freq_ptr, rope_scaling, qk_scale_log2, full_end, kv_end,
        PAGE_SIZE, BLOCK_N, HEAD_DIM, D_PAD, ROT, HALF_PAD, PASS_PAD, GPTJ, True, CAUSAL, DOT_PRECISION)

    out = acc / l_i[:, None]
    d = tl.arange(0, D_PAD)
    out_rows = out_ptr + (q_start + token).to(tl.int64) * stride_ot + head * stride_oh
    tl.store(out_rows[:, None] + d[None, :], out.to(out_ptr.dtype.element_ty),
             mask=row_ok[:, None] & (d[None, :] < HEAD_DIM))
