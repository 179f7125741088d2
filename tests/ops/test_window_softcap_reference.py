"""Sliding-window attention and logit softcapping: the float64 reference against a per-query brute force,
both backends against the reference (sequences longer than the window, prefill, extend and decode), and
the argument checks."""
from __future__ import annotations

import math

import pytest
import torch
from tests.kernels.batches import DTYPES, TOLERANCES, default_rope, expected_output, make_batch

import cattn
from cattn import reference


# (q_lens, kv_lens): prefill longer than the window, extend over a long history, decode, an idle sequence
SHAPES = {
    "prefill": ([37], [37]),
    "extend": ([5, 12], [61, 12]),
    "decode": ([1, 1, 1], [70, 2, 19]),
    "mixed": ([1, 0, 9], [33, 4, 40]),
}
OPTIONS = [dict(sliding_window=1), dict(sliding_window=7), dict(sliding_window=16, logit_softcap=2.5),
           dict(logit_softcap=0.7), dict(sliding_window=100)]   # 100: longer than every sequence


def brute_force(q, k_cache, v_cache, block_table, kv_lens, cu_seqlens_q, scale, window, softcap):
    """One query and one head at a time, in float64, straight from the definitions (no RoPE)."""
    out = torch.zeros_like(q)
    group = q.shape[1] // k_cache.shape[2]
    page_size = k_cache.shape[1]
    for b, kv_len in enumerate(kv_lens.tolist()):
        start, end = cu_seqlens_q[b].item(), cu_seqlens_q[b + 1].item()
        slots = [(block_table[b, i // page_size].item(), i % page_size) for i in range(kv_len)]
        keys = torch.stack([k_cache[p, o] for p, o in slots]) if slots else None
        values = torch.stack([v_cache[p, o] for p, o in slots]) if slots else None
        for j in range(end - start):
            pos = kv_len - (end - start) + j
            lo = 0 if window is None else max(0, pos - window + 1)
            for h in range(q.shape[1]):
                scores = keys[lo: pos + 1, h // group] @ q[start + j, h] * scale
                if softcap is not None:
                    scores = softcap * torch.tanh(scores / softcap)
                out[start + j, h] = scores.softmax(0) @ values[lo: pos + 1, h // group]
    return out


@pytest.mark.parametrize("options", OPTIONS, ids=str)
@pytest.mark.parametrize("shape", list(SHAPES))
def test_reference_equals_brute_force(shape, options):
    q_lens, kv_lens = SHAPES[shape]
    batch = make_batch(q_lens, kv_lens, num_kv_heads=2, group=3, head_dim=24, page_size=5, dtype=torch.float64)
    got = reference.paged_attention(batch.q, batch.k_cache, batch.v_cache, batch.block_table, batch.kv_lens,
                                    batch.cu_seqlens_q, None, sm_scale=0.3, **options)
    want = brute_force(batch.q, batch.k_cache, batch.v_cache, batch.block_table, batch.kv_lens, batch.cu_seqlens_q,
                       0.3, options.get("sliding_window"), options.get("logit_softcap"))
    torch.testing.assert_close(got, want, atol=1e-12, rtol=1e-12)


def test_window_and_softcap_change_the_result():
    """Guards the tests above: each option, where it binds, moves the output far beyond any tolerance."""
    batch = make_batch([9], [30], num_kv_heads=1, group=2, head_dim=16, page_size=4, dtype=torch.float64)
    plain = expected_output(batch, None)
    for options in (dict(sliding_window=7), dict(logit_softcap=0.5)):
        assert (expected_output(batch, None, **options) - plain).abs().max() > 1e-2


def run_backend(backend: str, dtype: torch.dtype, shape: str, options: dict, rope_style: str = "neox"):
    q_lens, kv_lens = SHAPES[shape]
    batch = make_batch(q_lens, kv_lens, num_kv_heads=2, group=2, head_dim=32, page_size=6, dtype=dtype)
    rope = default_rope(32, rope_style)
    out = cattn.paged_attention(batch.q, batch.k_cache, batch.v_cache, batch.block_table, batch.kv_lens,
                                batch.cu_seqlens_q, rope, backend=backend, **options)
    assert out.dtype == dtype and out.shape == batch.q.shape
    torch.testing.assert_close(out.double().cpu(), expected_output(batch, rope, **options), **TOLERANCES[dtype])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("options", OPTIONS, ids=str)
@pytest.mark.parametrize("shape", list(SHAPES))
def test_torch_backend_matches_reference(dtype, shape, options):
    run_backend("torch", dtype, shape, options, rope_style="gptj" if shape == "decode" else "neox")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("options", [dict(sliding_window=7), dict(sliding_window=16, logit_softcap=2.5),
                                     dict(logit_softcap=0.7)], ids=str)
@pytest.mark.parametrize("shape", list(SHAPES))
def test_triton_backend_matches_reference(dtype, shape, options):
    run_backend("triton", dtype, shape, options)


def _call(**options):
    batch = make_batch([2], [5], num_kv_heads=1, group=1, head_dim=16, page_size=4, dtype=torch.float32)
    return cattn.paged_attention(batch.q, batch.k_cache, batch.v_cache, batch.block_table, batch.kv_lens,
                                 batch.cu_seqlens_q, None, backend="torch", **options)


@pytest.mark.parametrize("options, exc, match", [
    (dict(sliding_window=0), ValueError, "sliding_window must be >= 1"),
    (dict(sliding_window=-3), ValueError, "sliding_window must be >= 1"),
    (dict(sliding_window=2.5), TypeError, "sliding_window must be None or an int"),
    (dict(sliding_window=True), TypeError, "sliding_window must be None or an int"),
    (dict(logit_softcap=0.0), ValueError, "logit_softcap must be finite and > 0"),
    (dict(logit_softcap=-1.0), ValueError, "logit_softcap must be finite and > 0"),
    (dict(logit_softcap=math.inf), ValueError, "logit_softcap must be finite and > 0"),
    (dict(logit_softcap=math.nan), ValueError, "logit_softcap must be finite and > 0"),
    (dict(logit_softcap="50"), TypeError, "logit_softcap must be None or a float"),
], ids=str)
def test_bad_window_and_softcap_are_refused(options, exc, match):
    with pytest.raises(exc, match=match):
        _call(**options)
