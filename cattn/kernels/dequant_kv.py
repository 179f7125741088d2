"""Expand 8-bit history KV (the store's host format) into model-dtype page slots."""
import triton
import triton.language as tl


@triton.jit
def dequant_kv_kernel(
    k_codes, k_scales, v_codes, v_scales, k_cache, v_cache, slot_mapping, num_tokens, phase,
    GROUP: tl.constexpr, NUM_KV_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, ROW_PAD: tl.constexpr,
    BLOCK_T: tl.constexpr,
):
    """One program per ``BLOCK_T`` tokens, each token one row of ``NUM_KV_HEADS * HEAD_DIM`` codes.

    k_codes, v_codes: ``[n, Hkv, D]`` int8 / fp8 e4m3, contiguous. k_scales: ``[G, 2, Hkv, D]`` per channel,
    step then offset, token ``t`` on row ``(phase + t) // GROUP``. v_scales: ``[n, Hkv]``, one per token and
    head. The caches are contiguous ``[num_pages, page_size, Hkv, D]``, so a slot is one row. Products are
    exact in fp32 (8-bit code times a 16-bit step), so ``code * step + offset`` has one fp32 rounding, fused
    or not, and one into the cache's dtype: the bits of `cattn.store.kvformat.codec`'s torch dequantization.
    """
    ROW: tl.constexpr = NUM_KV_HEADS * HEAD_DIM
    t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    col = tl.arange(0, ROW_PAD)[None, :]
    slot = tl.load(slot_mapping + t, mask=t < num_tokens, other=-1).to(tl.int64)
    live = (slot >= 0)[:, None] & (col < ROW)   # -1: a padding token, skipped
    src = t.to(tl.int64)[:, None] * ROW + col
    dst = slot[:, None] * ROW + col
    key_row = ((phase + t) // GROUP).to(tl.int64)[:, None]
    k = tl.load(k_codes + src, mask=live).to(tl.float32)   # masked lanes are never stored
    k_step = tl.load(k_scales + key_row * (2 * ROW) + col, mask=live, other=0).to(tl.float32)
    k_offset = tl.load(k_scales + key_row * (2 * ROW) + ROW + col, mask=live, other=0).to(tl.float32)
    tl.store(k_cache + dst, (k * k_step + k_offset).to(k_cache.dtype.element_ty), mask=live)
    v = tl.load(v_codes + src, mask=live).to(tl.float32)
    v_scale = tl.load(v_scales + t.to(tl.int64)[:, None] * NUM_KV_HEADS + col // HEAD_DIM, mask=live,
                      other=0).to(tl.float32)
    tl.store(v_cache + dst, (v * v_scale).to(v_cache.dtype.element_ty), mask=live)
