"""Triton paged attention against the float64 reference, on fresh random inputs.

Every batch is built adversarially: page ids are a random permutation (pages of one
sequence are neither contiguous nor ordered), unwritten cache slots and pages hold NaN
(a kernel that lets a masked-out key touch the sum fails), and block-table padding points
at arbitrary pages. The kernels run under TRITON_INTERPRET=1 on CPU; set
CATTN_TEST_DEVICE=cuda (and TRITON_INTERPRET=0) to run the same tests on a GPU, where bf16
is added to the dtypes.
"""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.kernels.batches import DEVICE, DTYPES, check, default_rope, longrope, make_batch


# ---- lengths around page and tile boundaries --------------------------------------------------

PAGE = 16


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("q_len, kv_len", [
    (1, 1), (PAGE - 1, PAGE - 1), (PAGE + 1, PAGE + 1),   # prefill of one token, one page less/more
    (67, 67), (33, 131),                                   # not multiples of any tile (16..128)
    (1, PAGE - 1), (5, PAGE + 1), (PAGE + 1, 200),         # extend
])
def test_lengths_around_pages_and_tiles(dtype, q_len, kv_len):
    batch = make_batch([q_len], [kv_len], num_kv_heads=1, group=4, head_dim=64, page_size=PAGE, dtype=dtype)
    check(batch, default_rope(64))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("page_size", [1, 5, 12, PAGE, 128])
def test_page_sizes_with_mixed_batch(dtype, page_size):
    """Decode and extend sequences in one batch, one with no query tokens at all."""
    batch = make_batch([1, 7, 0, 1, 30], [1, 40, 9, 77, 30], num_kv_heads=2, group=2, head_dim=64,
                       page_size=page_size, dtype=dtype)
    check(batch, default_rope(64))


# ---- GQA ratios x head dims, through both kernels ---------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("head_dim", [64, 128, 80, 96, 256])
@pytest.mark.parametrize("group", [1, 4, 7])
def test_gqa_and_head_dims(dtype, head_dim, group):
    rope = default_rope(head_dim)
    extend = make_batch([3, 20], [35, 20], num_kv_heads=2, group=group, head_dim=head_dim, page_size=PAGE,
                        dtype=dtype)
    check(extend, rope)
    decode = make_batch([1, 1, 1], [50, 1, 17], num_kv_heads=2, group=group, head_dim=head_dim, page_size=PAGE,
                        dtype=dtype)
    check(decode, rope)


# ---- split-KV decode over long contexts -------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kv_lens, num_kv_heads, group", [
    ([1100, 37], 1, 7),          # 3 splits; the short sequence leaves two of them empty
    ([600, 1, 513], 2, 4),       # 2 splits, one sequence of one token
])
def test_decode_long_context_splits(dtype, kv_lens, num_kv_heads, group, decode_splits):
    batch = make_batch([1] * len(kv_lens), kv_lens, num_kv_heads=num_kv_heads, group=group, head_dim=64,
                       page_size=PAGE, dtype=dtype)
    check(batch, default_rope(64))
    assert decode_splits and decode_splits[-1] >= 2


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_decode_with_idle_sequences_and_empty_splits(dtype, decode_splits):
    """q_len 0 sequences between decode ones; the wide block table makes splits past every kv_len."""
    batch = make_batch([1, 0, 1], [20, 5, 3], num_kv_heads=1, group=3, head_dim=64, page_size=PAGE, dtype=dtype,
                       pad_pages=70)
    check(batch, default_rope(64))
    assert decode_splits[-1] >= 2


# ---- rope variants and options ----------------------------------------------------------------

ROPES = {
    "none": lambda d: None,
    "partial": lambda d: default_rope(d // 2),
    "partial-odd-pairs": lambda d: default_rope(24),           # 12 pairs: not a power of two
    "gptj": lambda d: default_rope(d, "gptj"),
    "gptj-partial": lambda d: default_rope(d // 4, "gptj", base=500.0),
    "yarn-like-scaling": lambda d: default_rope(d, scaling=1.25),
    "longrope": longrope,
}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("rope_name", list(ROPES))
@pytest.mark.parametrize("head_dim", [64, 80])
def test_rope_variants(dtype, rope_name, head_dim):
    """kv_lens straddle longrope's switch length (64): each sequence picks its own factors."""
    rope = ROPES[rope_name](head_dim)
    check(make_batch([4, 1, 20], [40, 90, 65], num_kv_heads=1, group=4, head_dim=head_dim, page_size=PAGE,
                     dtype=dtype), rope)
    check(make_batch([1, 1], [64, 100], num_kv_heads=1, group=4, head_dim=head_dim, page_size=PAGE,
                     dtype=dtype), rope)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_not_causal(dtype):
    batch = make_batch([9, 30, 1], [20, 30, 12], num_kv_heads=2, group=3, head_dim=64, page_size=5, dtype=dtype)
    check(batch, default_rope(64), causal=False)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_custom_scale(dtype):
    batch = make_batch([6, 1], [24, 40], num_kv_heads=1, group=4, head_dim=64, page_size=PAGE, dtype=dtype)
    check(batch, default_rope(64), sm_scale=0.3)
    check(batch, default_rope(64), sm_scale=0.01)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("q_lens", [[5, 2], [1, 1]], ids=["extend", "decode"])
def test_out_buffer_is_filled_and_returned(dtype, q_lens):
    batch = make_batch(q_lens, [18, 33], num_kv_heads=2, group=2, head_dim=64, page_size=PAGE, dtype=dtype)
    # a strided buffer: rows of a wider tensor, as when attention writes into a fused output projection input
    wide = torch.full((sum(q_lens), 6, 64), float("nan"), dtype=dtype, device=DEVICE)
    out = wide[:, 1:5]
    result = check(batch, default_rope(64), out=out)
    assert result.data_ptr() == out.data_ptr()
    assert torch.isnan(wide[:, 0]).all() and torch.isnan(wide[:, 5]).all()   # nothing outside `out` written


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("q_lens", [[3, 8], [1, 1]], ids=["extend", "decode"])
def test_strided_inputs_and_int64_indices(dtype, q_lens):
    """q sliced from a fused QKV projection, K/V halves of one cache tensor, int64 index tensors."""
    batch = make_batch(q_lens, [21, 8], num_kv_heads=2, group=3, head_dim=80, page_size=12, dtype=dtype,
                       fused_qkv=True, fused_kv_cache=True)
    assert not batch.q.is_contiguous() and not batch.k_cache.is_contiguous()
    check(batch.index(torch.int64), default_rope(80))


# ---- shape fuzz -------------------------------------------------------------------------------

@settings(derandomize=True, max_examples=30, deadline=None)
@given(data=st.data(), num_seqs=st.integers(1, 3), num_kv_heads=st.integers(1, 2), group=st.integers(1, 5),
       head_dim=st.sampled_from([16, 32, 48, 64, 80, 96]), page_size=st.sampled_from([1, 3, 8, 16]),
       dtype=st.sampled_from(DTYPES), causal=st.booleans(), style=st.sampled_from(["neox", "gptj"]),
       rotary_fraction=st.sampled_from([0.0, 0.5, 1.0]))
def test_shape_fuzz(data, num_seqs, num_kv_heads, group, head_dim, page_size, dtype, causal, style, rotary_fraction):
    kv_lens = data.draw(st.lists(st.integers(1, 90), min_size=num_seqs, max_size=num_seqs), label="kv_lens")
    decode = data.draw(st.booleans(), label="decode")
    q_lens = [1] * num_seqs if decode else [data.draw(st.integers(0, n), label="q_len") for n in kv_lens]
    rotary_dim = int(head_dim * rotary_fraction) // 2 * 2
    rope = default_rope(rotary_dim, style) if rotary_dim else None
    batch = make_batch(q_lens, kv_lens, num_kv_heads=num_kv_heads, group=group, head_dim=head_dim,
                       page_size=page_size, dtype=dtype)
    check(batch, rope, causal=causal)
