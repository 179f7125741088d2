"""Triton dequant_kv (the store's 8-bit history expanded into page slots) against torch: the store's own
dequantization (`cattn.store.kvformat.codec`) scattered by index_copy_. Both compute ``code * step + offset``
(keys) and ``code * scale`` (values) in fp32 with the same roundings, so the caches must match bit for bit. Caches start random, so a slot written
by mistake, or a skipped (-1) slot written anyway, shows. CATTN_TEST_DEVICE=cuda adds bf16."""
from __future__ import annotations

import os

import pytest
import torch

from cattn.ops import dequant_kv
from cattn.store.kvformat.codec import dequantize_keys, dequantize_values, quantize_keys, quantize_values

DEVICE = torch.device(os.environ.get("CATTN_TEST_DEVICE", "cpu"))
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if DEVICE.type == "cuda" else [])
GROUP = 16   # a small key group, so that a few tokens cross group boundaries


def reference(kc, ks, vc, vs, k_cache, v_cache, slots, phase):
    live = slots >= 0
    k = dequantize_keys(kc.cpu(), ks.cpu(), ks.dtype, phase=phase, group=GROUP)[live.cpu()]
    v = dequantize_values(vc.cpu(), vs.cpu(), vs.dtype)[live.cpu()]
    for cache, x in ((k_cache, k), (v_cache, v)):
        cache.view(-1, *cache.shape[2:]).index_copy_(0, slots[live], x.to(cache.device))


@pytest.mark.parametrize("kv_format", ["int8", "fp8"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("heads,head_dim", [(1, 8), (3, 20), (2, 64)])
@pytest.mark.parametrize("num_tokens,phase", [(1, 0), (7, 3), (40, 0), (41, GROUP - 1)])
def test_dequant_kv_matches_torch(kv_format, dtype, heads, head_dim, num_tokens, phase):
    g = torch.Generator().manual_seed(num_tokens * 31 + heads)
    chunk = phase + num_tokens                 # the tokens are [phase, phase + n) of a chunk
    k = (torch.randn(chunk, heads, head_dim, generator=g) * torch.logspace(-1, 1, head_dim)).to(dtype)
    v = torch.randn(chunk, heads, head_dim, generator=g).to(dtype)
    kc, ks = quantize_keys(k, kv_format, group=GROUP)
    vc, vs = quantize_values(v, kv_format)
    kc, vc, vs = kc[phase:], vc[phase:], vs[phase:]
    page, pages = 4, -(-2 * num_tokens // 4) + 1
    slots = torch.randperm(pages * page, generator=g)[:num_tokens]
    slots[::5] = -1                            # padding tokens are skipped
    shape = (pages, page, heads, head_dim)
    k_cache, v_cache = (torch.randn(shape, generator=g).to(dtype).to(DEVICE) for _ in range(2))
    k_ref, v_ref = k_cache.clone(), v_cache.clone()
    moved = [t.contiguous().to(DEVICE) for t in (kc, ks, vc, vs)]
    slots = slots.to(DEVICE)
    reference(*moved, k_ref, v_ref, slots, phase)
    dequant_kv(*moved, k_cache, v_cache, slots, phase=phase, group=GROUP)
    assert torch.equal(k_cache, k_ref) and torch.equal(v_cache, v_ref)


def test_bad_arguments_are_refused_by_name():
    kc, vc = torch.zeros(4, 2, 8, dtype=torch.int8), torch.zeros(4, 2, 8, dtype=torch.int8)
    ks, vs = torch.ones(1, 2, 2, 8), torch.ones(4, 2)
    cache = torch.zeros(2, 4, 2, 8)
    slots = torch.arange(4)
    with pytest.raises(TypeError, match="k_codes"):
        dequant_kv(kc.float(), ks, vc, vs, cache, cache.clone(), slots)
    with pytest.raises(ValueError, match="v_scales"):
        dequant_kv(kc, ks, vc, vs[:3], cache, cache.clone(), slots)
    with pytest.raises(ValueError, match="k_scales"):
        dequant_kv(kc, ks.half(), vc, vs, cache, cache.clone(), slots)
    with pytest.raises(ValueError, match="phase"):
        dequant_kv(kc, ks, vc, vs, cache, cache.clone(), slots, phase=128)
    with pytest.raises(ValueError, match="slot_mapping"):
        dequant_kv(kc, ks, vc, vs, cache, cache.clone(), slots[:2])
    with pytest.raises(ValueError, match="k_cache"):
        dequant_kv(kc, ks, vc, vs, torch.zeros(2, 4, 3, 8), torch.zeros(2, 4, 3, 8), slots)
