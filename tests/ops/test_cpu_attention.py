"""The CPU path built for speed (`cattn.cpu_attention`, what ``backend="auto"`` runs on CPU) against the
float64 oracle, on the adversarial batches of the kernel tests: fp32 and bf16, GQA, prefill, extend and
decode mixed, every rope kind (partial, gptj, scaled, longrope on both sides of its switch), sliding
windows, softcapping (which falls back to the reference), non-causal, and an output buffer."""
import pytest
import torch

import cattn
from cattn import cpu_attention, reference
from tests.kernels.batches import default_rope, longrope, make_batch

TOLERANCES = {torch.float32: 2e-6, torch.bfloat16: 8e-3}   # max |out - ref| / (1 + |ref|)


ROPES = {
    "none": lambda d: None,
    "default": lambda d: default_rope(d),
    "partial-odd-pairs": lambda d: default_rope(d - 2 * 5),
    "gptj-partial": lambda d: default_rope(d // 2, "gptj", base=500.0),
    "scaled": lambda d: default_rope(d, scaling=1.25),
    "longrope": lambda d: longrope(d, original_max_position=40),
}
# (q_lens, kv_lens): prefills, extends and decodes in one batch; the 41 and 70 cross longrope's switch at 40
BATCHES = [([7, 1, 23, 1], [7, 41, 70, 3]), ([1, 1, 1], [40, 41, 96]), ([33], [33])]


def check(batch, rope, **kwargs):
    as64 = [t.double() if t.is_floating_point() else t for t in
            (batch.q, batch.k_cache, batch.v_cache, batch.block_table, batch.kv_lens, batch.cu_seqlens_q)]
    want = reference.paged_attention(*as64, rope, **kwargs)
    got = cattn.paged_attention(batch.q, batch.k_cache, batch.v_cache, batch.block_table, batch.kv_lens,
                                batch.cu_seqlens_q, rope, **kwargs)
    assert got.dtype == batch.q.dtype and got.shape == batch.q.shape
    err = ((got.double() - want).abs() / (1 + want.abs())).max().item()
    assert err <= TOLERANCES[batch.q.dtype], err
    return got


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("rope_name", list(ROPES))
@pytest.mark.parametrize("q_lens, kv_lens", BATCHES)
def test_every_rope_kind_and_batch_shape(dtype, rope_name, q_lens, kv_lens):
    batch = make_batch(q_lens, kv_lens, num_kv_heads=2, group=3, head_dim=32, page_size=5, dtype=dtype)
    check(batch, ROPES[rope_name](32))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("window", [1, 6, 50])
@pytest.mark.parametrize("causal", [True, False])
def test_sliding_windows_causal_or_not(dtype, window, causal):
    batch = make_batch([9, 1, 30], [20, 45, 30], num_kv_heads=1, group=4, head_dim=16, page_size=4, dtype=dtype)
    check(batch, default_rope(16), sliding_window=window, causal=causal)


def test_non_causal_custom_scale_and_an_output_buffer():
    batch = make_batch([6, 11], [6, 30], num_kv_heads=3, group=1, head_dim=24, page_size=7, dtype=torch.float32)
    out = torch.full_like(batch.q, float("nan"))
    got = check(batch, default_rope(24, "gptj"), causal=False, sm_scale=0.3, out=out)
    assert got.data_ptr() == out.data_ptr()


def test_softcap_and_float64_run_the_reference(monkeypatch):
    calls = []
    original = reference.paged_attention
    monkeypatch.setattr(reference, "paged_attention", lambda *a, **k: calls.append(1) or original(*a, **k))
    batch = make_batch([4, 1], [9, 12], num_kv_heads=2, group=2, head_dim=16, page_size=4, dtype=torch.float32)
    check(batch, default_rope(16), logit_softcap=5.0)        # (check's own oracle call counts too)
    assert len(calls) == 2
    args = [t.double() if t.is_floating_point() else t for t in
            (batch.q, batch.k_cache, batch.v_cache, batch.block_table, batch.kv_lens, batch.cu_seqlens_q)]
    cpu_attention.paged_attention(*args, default_rope(16))
    assert len(calls) == 3


def test_torch_backend_is_still_the_plain_reference(monkeypatch):
    monkeypatch.setattr(cpu_attention, "paged_attention", lambda *a, **k: pytest.fail("the fast path ran"))
    batch = make_batch([3], [8], num_kv_heads=1, group=2, head_dim=16, page_size=4, dtype=torch.float32)
    cattn.paged_attention(batch.q, batch.k_cache, batch.v_cache, batch.block_table, batch.kv_lens,
                          batch.cu_seqlens_q, default_rope(16), backend="torch")
