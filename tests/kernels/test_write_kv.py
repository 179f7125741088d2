"""Triton write_kv against the reference scatter: a copy, so the caches must match bit for bit.

Caches start as random data (never zeros) so that a slot written by mistake, or a skipped
slot written anyway, shows. CATTN_TEST_DEVICE=cuda runs the same tests on a GPU with bf16.
"""
from __future__ import annotations

import os

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import cattn
from cattn import reference

BACKEND = "triton"
DEVICE = torch.device(os.environ.get("CATTN_TEST_DEVICE", "cpu"))
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if DEVICE.type == "cuda" else [])


def run_both(k, v, num_pages, page_size, slot_mapping, *, fused_cache=False):
    """Write with the kernel and with the reference into identical random caches; returns both pairs."""
    num_kv_heads, head_dim = k.shape[1:]
    if fused_cache:    # K and V halves of one [num_pages, 2, page_size, H, D] tensor
        kv = torch.randn(num_pages, 2, page_size, num_kv_heads, head_dim).to(k.dtype).to(DEVICE)
        k_cache, v_cache = kv[:, 0], kv[:, 1]
    else:
        shape = (num_pages, page_size, num_kv_heads, head_dim)
        k_cache, v_cache = (torch.randn(shape).to(k.dtype).to(DEVICE) for _ in range(2))
    k_ref, v_ref = k_cache.clone(), v_cache.clone()
    reference.write_kv(k, v, k_ref, v_ref, slot_mapping)
    cattn.write_kv(k, v, k_cache, v_cache, slot_mapping, backend=BACKEND)
    return (k_cache, v_cache), (k_ref, v_ref)


def random_slots(num_tokens: int, num_pages: int, page_size: int, skip: float = 0.0) -> torch.Tensor:
    """Distinct random slots over the whole pool (tokens land on shuffled pages), some -1 if ``skip``."""
    slots = torch.randperm(num_pages * page_size)[:num_tokens]
    slots[torch.rand(num_tokens) < skip] = -1
    return slots.to(torch.int32).to(DEVICE)


def assert_same(written, expected):
    for got, want in zip(written, expected):
        assert torch.equal(got, want)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("num_kv_heads, head_dim", [(1, 64), (2, 128), (3, 80), (8, 96)])
@pytest.mark.parametrize("page_size", [5, 16])
def test_write_kv_matches_reference(dtype, num_kv_heads, head_dim, page_size):
    num_pages, num_tokens = 7, 23
    k = torch.randn(num_tokens, num_kv_heads, head_dim).to(dtype).to(DEVICE)
    v = torch.randn(num_tokens, num_kv_heads, head_dim).to(dtype).to(DEVICE)
    slots = random_slots(num_tokens, num_pages, page_size, skip=0.2)
    written, expected = run_both(k, v, num_pages, page_size, slots)
    assert_same(written, expected)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_skipped_slots_leave_the_cache_untouched(dtype):
    """Slot -1 marks padding tokens: nothing of theirs reaches the cache."""
    k = torch.randn(6, 2, 64).to(dtype).to(DEVICE)
    v = torch.randn(6, 2, 64).to(dtype).to(DEVICE)
    slots = torch.tensor([-1, 3, -1, -1, 17, -1], dtype=torch.int32, device=DEVICE)
    shape = (4, 5, 2, 64)
    k_cache, v_cache = torch.randn(shape).to(dtype).to(DEVICE), torch.randn(shape).to(dtype).to(DEVICE)
    k_before, v_before = k_cache.clone(), v_cache.clone()
    cattn.write_kv(k, v, k_cache, v_cache, slots, backend=BACKEND)
    changed = (k_cache != k_before).flatten(2).any(-1).nonzero().tolist()
    assert changed == [[0, 3], [3, 2]]                   # slots 3 and 17 only
    assert torch.equal(k_cache[0, 3], k[1]) and torch.equal(v_cache[3, 2], v[4])
    assert torch.equal((v_cache != v_before).flatten(2).any(-1).nonzero(), torch.tensor(changed, device=DEVICE))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_strided_inputs_int64_slots_and_fused_cache(dtype):
    """k, v sliced from a fused QKV projection, int64 slots, caches that are halves of one tensor."""
    qkv = torch.randn(11, 4 + 2 + 2, 80).to(dtype).to(DEVICE)
    k, v = qkv[:, 4:6], qkv[:, 6:8]
    assert not k.is_contiguous()
    slots = random_slots(11, 5, 12, skip=0.3).long()
    written, expected = run_both(k, v, 5, 12, slots, fused_cache=True)
    assert_same(written, expected)


def test_no_tokens_is_a_no_op():
    k = torch.empty(0, 2, 64, device=DEVICE)
    written, expected = run_both(k, k, 3, 16, torch.empty(0, dtype=torch.int32, device=DEVICE))
    assert_same(written, expected)


@settings(derandomize=True, max_examples=25, deadline=None)
@given(num_tokens=st.integers(1, 40), num_kv_heads=st.integers(1, 5), head_dim=st.sampled_from([16, 48, 64, 80]),
       page_size=st.sampled_from([1, 3, 16]), dtype=st.sampled_from(DTYPES), skip=st.sampled_from([0.0, 0.5]))
def test_write_kv_fuzz(num_tokens, num_kv_heads, head_dim, page_size, dtype, skip):
    num_pages = -(-num_tokens // page_size) + 2
    k = torch.randn(num_tokens, num_kv_heads, head_dim).to(dtype).to(DEVICE)
    v = torch.randn(num_tokens, num_kv_heads, head_dim).to(dtype).to(DEVICE)
    written, expected = run_both(k, v, num_pages, page_size, random_slots(num_tokens, num_pages, page_size, skip))
    assert_same(written, expected)
