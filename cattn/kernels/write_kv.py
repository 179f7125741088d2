"""Scatter new pre-RoPE K/V rows into their page slots."""
import triton
import triton.language as tl


@triton.jit
def write_kv_kernel(
    k_ptr, v_ptr, k_cache, v_cache, slot_mapping,
    stride_kt, stride_kh, stride_vt, stride_vh,
    stride_kcp, stride_kct, stride_kch, stride_vcp, stride_vct, stride_vch,
    NUM_KV_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, HEADS_PAD: tl.constexpr, D_PAD: tl.constexpr,
    PAGE_SIZE: tl.constexpr,
):
    """One program per token: all its heads of K and V."""
    t = tl.program_id(0)
    slot = tl.load(slot_mapping + t).to(tl.int64)
    if slot < 0:  # padding token
        return
    page, offset = slot // PAGE_SIZE, slot % PAGE_SIZE
    h = tl.arange(0, HEADS_PAD)[:, None]
    d = tl.arange(0, D_PAD)[None, :]
    mask = (h < NUM_KV_HEADS) & (d < HEAD_DIM)
    k = tl.load(k_ptr + t * stride_kt + h * stride_kh + d, mask=mask)
    v = tl.load(v_ptr + t * stride_vt + h * stride_vh + d, mask=mask)
    tl.store(k_cache + page * stride_kcp + offset * stride_kct + h * stride_kch + d, k, mask=mask)
    tl.store(v_cache + page * stride_vcp + offset * stride_vct + h * stride_vch + d, v, mask=mask)
