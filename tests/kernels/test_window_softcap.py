"""Sliding-window attention, logit softcapping and far positions (the cos/sin table past 128K) on the
Triton kernels against the float64 reference, prefill/extend and decode, sequences longer than the window."""
from __future__ import annotations

import pytest
import torch

import cattn
from cattn import RopeSpec, reference
from cattn.rope_table import MIN_POSITIONS, build_table, cos_sin_table
from tests.kernels.batches import DEVICE, DTYPES, check, default_rope, make_batch


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("window", [1, 7, 40, 1000])
def test_sliding_window_extend_and_decode(dtype, window):
    rope = default_rope(32)
    # extend: prefill, extend past the window, one token; decode over several splits
    batch = make_batch([37, 20, 1, 64], [37, 150, 90, 64], num_kv_heads=2, group=3, head_dim=32, page_size=5,
                       dtype=dtype)
    check(batch, rope, sliding_window=window)
    batch = make_batch([1, 1, 1], [1, 700, window + 3], num_kv_heads=2, group=4, head_dim=32, page_size=16,
                       dtype=dtype)
    check(batch, rope, sliding_window=window)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("softcap", [0.5, 5.0, 50.0])
def test_logit_softcap(dtype, softcap):
    rope = default_rope(16)
    batch = make_batch([9, 1], [40, 33], num_kv_heads=1, group=2, head_dim=16, page_size=8, dtype=dtype)
    batch.q.mul_(3.0)   # large scores, so the cap bites
    check(batch, rope, logit_softcap=softcap)
    decode = make_batch([1, 1], [600, 3], num_kv_heads=1, group=2, head_dim=16, page_size=8, dtype=dtype)
    check(decode, rope, logit_softcap=softcap)


def test_window_softcap_and_scale_together():
    """Gemma 2's combination: window, softcap and a custom scale, non-power-of-two head."""
    rope = default_rope(24)
    batch = make_batch([30, 1], [90, 61], num_kv_heads=2, group=2, head_dim=24, page_size=16, dtype=torch.float32)
    check(batch, rope, sliding_window=16, logit_softcap=20.0, sm_scale=0.3)


def test_window_differs_from_full_attention():
    """The window must change the answer (a test on a window wider than every sequence could not fail)."""
    rope = default_rope(16)
    batch = make_batch([8], [64], num_kv_heads=1, group=1, head_dim=16, page_size=16, dtype=torch.float32)
    args = (batch.q, batch.k_cache, batch.v_cache, batch.block_table, batch.kv_lens, batch.cu_seqlens_q, rope)
    full = cattn.paged_attention(*args, backend="triton")
    windowed = cattn.paged_attention(*args, backend="triton", sliding_window=8)
    assert (full - windowed).abs().max() > 1e-2


@pytest.mark.parametrize("dtype", DTYPES)
def test_positions_past_128k(dtype):
    """Keys and queries near position 140K read rows of a table grown past 128K (nothing clamped):
    a sequence whose pages are mostly padding-free but whose block table spans 140K positions."""
    rope = default_rope(32, base=10000.0)
    page_size, kv_len = 1024, 140_000
    pages = -(-kv_len // page_size)
    num_kv_heads, head_dim = 1, 32
    k_cache = torch.randn(pages, page_size, num_kv_heads, head_dim).to(dtype)
    v_cache = torch.randn_like(k_cache)
    block_table = torch.randperm(pages, dtype=torch.int32)[None, :]
    q = torch.randn(3, 2, head_dim).to(dtype)
    cu = torch.tensor([0, 3], dtype=torch.int32)
    kv_lens = torch.tensor([kv_len], dtype=torch.int32)
    # a window keeps the interpreter's work small while every key read sits past 128K
    on = lambda t: t.to(DEVICE)  # noqa: E731
    rope_on = rope.to(DEVICE)
    out = cattn.paged_attention(on(q), on(k_cache), on(v_cache), on(block_table), on(kv_lens), on(cu), rope_on,
                                backend="triton", sliding_window=50).cpu()
    expected = reference.paged_attention(q.double(), k_cache.double(), v_cache.double(), block_table, kv_lens, cu,
                                         rope, sliding_window=50)
    tol = {torch.float32: 2e-5, torch.float16: 3e-3, torch.bfloat16: 2e-2}[dtype]
    torch.testing.assert_close(out.double(), expected, atol=tol, rtol=tol)
    assert cos_sin_table(rope_on, 1, dtype, DEVICE).shape[1] >= pages * page_size


def test_table_is_hf_cos_sin_and_grows():
    """Rows are HF's cos/sin: fp32 angle, fp32 cos/sin times attention_scaling, rounded to the dtype."""
    inv_freq = 1.0 / (500000.0 ** (torch.arange(0, 64, 2).float() / 64))
    long = inv_freq / 3
    rope = RopeSpec(inv_freq, 1.25, "neox", long, 4096)
    table = build_table(rope, 300, torch.bfloat16, torch.device("cpu"))
    assert table.shape == (2, 300, 64) and table.dtype == torch.bfloat16
    pos = torch.arange(300, dtype=torch.float32)[:, None]
    for s, freqs in enumerate((inv_freq, long)):
        angle = pos * freqs[None, :]
        assert torch.equal(table[s, :, :32], (angle.cos() * 1.25).to(torch.bfloat16))
        assert torch.equal(table[s, :, 32:], (angle.sin() * 1.25).to(torch.bfloat16))
    small = cos_sin_table(rope, 10, torch.float32, torch.device("cpu"))
    assert small.shape[1] == MIN_POSITIONS
    assert cos_sin_table(rope, MIN_POSITIONS, torch.float32, torch.device("cpu")) is small   # cached
    grown = cos_sin_table(rope, MIN_POSITIONS + 1, torch.float32, torch.device("cpu"))
    assert grown.shape[1] == 2 * MIN_POSITIONS and torch.equal(grown[:, :MIN_POSITIONS], small)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("style, rotary_dim", [("neox", 256), ("gptj", 128)])
def test_head_dim_256_pre_rotated_q_with_window_and_softcap(dtype, style, rotary_dim):
    """Gemma's shape: 256-wide heads (Q rotated in its own pass for 16-bit), a window and a softcap."""
    rope = default_rope(rotary_dim, style)
    batch = make_batch([19, 1, 6], [19, 70, 40], num_kv_heads=1, group=2, head_dim=256, page_size=16, dtype=dtype)
    check(batch, rope, sliding_window=24, logit_softcap=30.0)


@pytest.mark.parametrize("kwargs, name, error", [
    (dict(sliding_window=0), "sliding_window", ValueError), (dict(sliding_window=2.0), "sliding_window", TypeError),
    (dict(sliding_window=True), "sliding_window", TypeError), (dict(logit_softcap=0.0), "logit_softcap", ValueError),
    (dict(logit_softcap=float("inf")), "logit_softcap", ValueError),
    (dict(logit_softcap=True), "logit_softcap", TypeError), (dict(logit_softcap=-1.0), "logit_softcap", ValueError),
])
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_bad_window_or_softcap_is_refused_naming_it(kwargs, name, error, backend):
    batch = make_batch([2], [5], num_kv_heads=1, group=1, head_dim=16, page_size=4, dtype=torch.float32)
    with pytest.raises(error, match=name):
        cattn.paged_attention(batch.q, batch.k_cache, batch.v_cache, batch.block_table, batch.kv_lens,
                              batch.cu_seqlens_q, default_rope(16), backend=backend, **kwargs)
