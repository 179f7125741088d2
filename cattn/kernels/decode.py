"""Decode: one query token per sequence, split-KV.

Grid: (sequences, KV heads, splits). A program's rows are the ``GROUP`` query heads
of one KV head, so each K/V page is read once per KV head; each split covers a
contiguous run of key tiles and writes its normalised partial output and its
log-sum-exp (base 2). `merge_splits_kernel` combines the splits.
"""
import triton
import triton.language as tl

from cattn.kernels.attend import attend_kv_range, load_rotated_q


@triton.jit
def paged_decode_kernel(
    q_ptr, k_cache, v_cache, partial_out, partial_lse, block_table, kv_lens, cu_seqlens_q, cos_sin_ptr,
    long_after, table_set_stride, score_scale, cap_log2, window, num_splits,
    stride_qt, stride_qh, stride_kp, stride_kt, stride_kh, stride_vp, stride_vt, stride_vh, stride_bt,
    GROUP: tl.constexpr, PAGE_SIZE: tl.constexpr, HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, ROT: tl.constexpr,
    HALF_PAD: tl.constexpr, PASS_PAD: tl.constexpr, GPTJ: tl.constexpr, WINDOWED: tl.constexpr,
    SOFTCAP: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    seq, kv_head, split = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    q_start = tl.load(cu_seqlens_q + seq)
    if tl.load(cu_seqlens_q + seq + 1) == q_start:  # no query token for this sequence
        return
    kv_len = tl.load(kv_lens + seq)
    # longrope: sequences past the switch length read the long factors' table set
    cos_sin_set = cos_sin_ptr + (kv_len > long_after).to(tl.int64) * table_set_stride
    # the keys this token may see: all of them, or the last `window`; splits share them out by tiles
    kv_start = 0
    if WINDOWED:
        kv_start = tl.maximum(kv_len - window, 0) // BLOCK_N * BLOCK_N
    tiles_per_split = tl.cdiv(tl.cdiv(kv_len - kv_start, BLOCK_N), num_splits)
    lo = kv_start + split * tiles_per_split * BLOCK_N
    hi = tl.minimum(lo + tiles_per_split * BLOCK_N, kv_len)

    rows = tl.arange(0, BLOCK_H)
    head = kv_head * GROUP + rows
    row_ok = rows < GROUP
    q_pos = tl.zeros([BLOCK_H], dtype=tl.int32) + (kv_len - 1)
    q_rows = q_ptr + q_start.to(tl.int64) * stride_qt + head * stride_qh
    q_rot, q_rest = load_rotated_q(q_rows, row_ok, q_pos, cos_sin_set, HEAD_DIM, ROT, HALF_PAD, PASS_PAD, GPTJ)

    acc = tl.zeros([BLOCK_H, D_PAD], dtype=tl.float32)
    m_i = tl.full([BLOCK_H], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_H], dtype=tl.float32)
    # [lo, full_lo) masked (the window's lower edge), [full_lo, full_hi) unmasked, [full_hi, hi) masked
    full_lo = lo
    if WINDOWED:
        full_lo = tl.minimum(tl.maximum(tl.cdiv(kv_len - window, BLOCK_N) * BLOCK_N, lo), hi)
    full_hi = tl.maximum(full_lo, hi // BLOCK_N * BLOCK_N)
    bt_row = block_table + seq.to(tl.int64) * stride_bt
    k_off, v_off = kv_head * stride_kh, kv_head * stride_vh
    if WINDOWED:
        acc, m_i, l_i = attend_kv_range(
            acc, m_i, l_i, q_rot, q_rest, q_pos, k_cache, v_cache, bt_row, kv_len, k_off, v_off,
            stride_kp, stride_kt, stride_vp, stride_vt, cos_sin_set, score_scale, cap_log2, window, lo, full_lo,
            PAGE_SIZE, BLOCK_N, HEAD_DIM, D_PAD, ROT, HALF_PAD, PASS_PAD, GPTJ,
            MASKED=True, CAUSAL=False, WINDOWED=WINDOWED, SOFTCAP=SOFTCAP, K_IN_DTYPE=False,
            DOT_PRECISION=DOT_PRECISION)
    acc, m_i, l_i = attend_kv_range(
        acc, m_i, l_i, q_rot, q_rest, q_pos, k_cache, v_cache, bt_row, kv_len, k_off, v_off,
        stride_kp, stride_kt, stride_vp, stride_vt, cos_sin_set, score_scale, cap_log2, window, full_lo, full_hi,
        PAGE_SIZE, BLOCK_N, HEAD_DIM, D_PAD, ROT, HALF_PAD, PASS_PAD, GPTJ,
        MASKED=False, CAUSAL=False, WINDOWED=WINDOWED, SOFTCAP=SOFTCAP, K_IN_DTYPE=False,
        DOT_PRECISION=DOT_PRECISION)
    acc, m_i, l_i = attend_kv_range(
        acc, m_i, l_i, q_rot, q_rest, q_pos, k_cache, v_cache, bt_row, kv_len, k_off, v_off,
        stride_kp, stride_kt, stride_vp, stride_vt, cos_sin_set, score_scale, cap_log2, window, full_hi, hi,
        PAGE_SIZE, BLOCK_N, HEAD_DIM, D_PAD, ROT, HALF_PAD, PASS_PAD, GPTJ,
        MASKED=True, CAUSAL=False, WINDOWED=WINDOWED, SOFTCAP=SOFTCAP, K_IN_DTYPE=False,
        DOT_PRECISION=DOT_PRECISION)

    # partial_out [num_q_tokens, Hq, num_splits, D_PAD] fp32, partial_lse [num_q_tokens, Hq, num_splits] fp32
    empty = l_i == 0.0  # a split past kv_len: weight 0 in the merge
    lse = tl.where(empty, float("-inf"), m_i + tl.math.log2(tl.where(empty, 1.0, l_i)))
    out = acc / tl.where(empty, 1.0, l_i)[:, None]
    slot = (q_start.to(tl.int64) * (GROUP * tl.num_programs(1)) + head) * num_splits + split
    d = tl.arange(0, D_PAD)
    tl.store(partial_out + slot[:, None] * D_PAD + d[None, :], out, mask=row_ok[:, None])
    tl.store(partial_lse + slot, lse, mask=row_ok)


@triton.jit
def merge_splits_kernel(
    partial_out, partial_lse, out_ptr, num_splits, stride_ot, stride_oh,
    NUM_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, SPLITS_PAD: tl.constexpr,
):
    """One program per (query token, query head): weight each split by 2^(lse - max lse)."""
    token, head = tl.program_id(0), tl.program_id(1)
    splits = tl.arange(0, SPLITS_PAD)
    base = (token.to(tl.int64) * NUM_HEADS + head) * num_splits
    lse = tl.load(partial_lse + base + splits, mask=splits < num_splits, other=float("-inf"))
    weight = tl.math.exp2(lse - tl.max(lse, 0))
    d = tl.arange(0, D_PAD)
    parts = tl.load(partial_out + (base + splits)[:, None] * D_PAD + d[None, :], mask=(splits < num_splits)[:, None],
                    other=0.0)
    out = tl.sum(parts * weight[:, None], 0) / tl.sum(weight, 0)
    tl.store(out_ptr + token.to(tl.int64) * stride_ot + head * stride_oh + d, out.to(out_ptr.dtype.element_ty),
             mask=d < HEAD_DIM)
