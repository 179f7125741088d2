"""Adversarial paged batches for the attention kernels and the float64 expectation they are checked
against: page ids a random permutation, unwritten slots and pages NaN, block-table padding pointing at
arbitrary pages. The kernels run under TRITON_INTERPRET=1 on CPU; CATTN_TEST_DEVICE=cuda (and
TRITON_INTERPRET=0) runs the same tests on a GPU, where bf16 joins the dtypes."""
from __future__ import annotations

import math
import os
from dataclasses import dataclass

import torch

import cattn
from cattn import RopeSpec, reference

BACKEND = "triton"
DEVICE = torch.device(os.environ.get("CATTN_TEST_DEVICE", "cpu"))
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if DEVICE.type == "cuda" else [])
# fp32 runs the IEEE dot path and fp32 softmax: only summation order differs from float64
# (worst error seen under the interpreter: 7e-7). fp16/bf16: rotated Q and K and the
# probabilities are rounded to the input dtype for the dot products, as in any tensor-core
# attention (worst fp16 error seen: 1.6e-3); bf16 keeps 3 fewer mantissa bits than fp16.
TOLERANCES = {
    torch.float32: dict(atol=5e-6, rtol=5e-6),
    torch.float16: dict(atol=3e-3, rtol=3e-3),
    torch.bfloat16: dict(atol=2e-2, rtol=2e-2),
}


def default_rope(rotary_dim: int, style: str = "neox", base: float = 10000.0, scaling: float = 1.0) -> RopeSpec:
    return RopeSpec(1.0 / (base ** (torch.arange(0, rotary_dim, 2).float() / rotary_dim)), scaling, style)


@dataclass
class Batch:
    q: torch.Tensor
    k_cache: torch.Tensor
    v_cache: torch.Tensor
    block_table: torch.Tensor
    kv_lens: torch.Tensor
    cu_seqlens_q: torch.Tensor

    def index(self, dtype: torch.dtype) -> Batch:
        return Batch(self.q, self.k_cache, self.v_cache, self.block_table.to(dtype), self.kv_lens.to(dtype),
                     self.cu_seqlens_q.to(dtype))


def longrope(head_dim: int, original_max_position: int = 64) -> RopeSpec:
    """A longrope-style spec: scaled long factors past ``original_max_position``."""
    half = head_dim // 2
    short = 1.0 / (10000.0 ** (torch.arange(half).float() / half))
    return RopeSpec(short, 1.19, "neox", long_inv_freq=short / torch.linspace(1.0, 4.0, half),
                    original_max_position=original_max_position)


def make_batch(q_lens: list[int], kv_lens: list[int], *, num_kv_heads: int, group: int, head_dim: int,
               page_size: int, dtype: torch.dtype, spare_pages: int = 3, pad_pages: int = 2,
               fused_qkv: bool = False, fused_kv_cache: bool = False) -> Batch:
    """A batch whose sequence ``b`` has ``kv_lens[b]`` cached tokens and its last ``q_lens[b]`` as queries.

    ``fused_qkv`` makes q a head slice of a [T, Hq + 2 Hkv, D] projection (token stride > Hq * D);
    ``fused_kv_cache`` makes k_cache, v_cache the halves of one [num_pages, 2, page_size, Hkv, D] tensor.
    """
    pages_per_seq = [math.ceil(n / page_size) for n in kv_lens]
    num_pages = sum(pages_per_seq) + spare_pages
    shape = (num_pages, page_size, num_kv_heads, head_dim)
    if fused_kv_cache:
        kv = torch.full((num_pages, 2, page_size, num_kv_heads, head_dim), float("nan"), dtype=dtype)
        k_cache, v_cache = kv[:, 0], kv[:, 1]
    else:
        k_cache, v_cache = torch.full(shape, float("nan"), dtype=dtype), torch.full(shape, float("nan"), dtype=dtype)
    page_ids = torch.randperm(num_pages)
    block_table = torch.randint(0, num_pages, (len(kv_lens), max(pages_per_seq, default=0) + pad_pages),
                                dtype=torch.int32)
    used = 0
    for b, (n, p) in enumerate(zip(kv_lens, pages_per_seq)):
        pages = page_ids[used: used + p]
        used += p
        block_table[b, :p] = pages
        tokens = torch.arange(n)
        page_of, offset = pages[tokens // page_size], tokens % page_size
        k_cache[page_of, offset] = torch.randn(n, num_kv_heads, head_dim).to(dtype)
        v_cache[page_of, offset] = torch.randn(n, num_kv_heads, head_dim).to(dtype)
    total_q, num_q_heads = sum(q_lens), num_kv_heads * group
    if fused_qkv:
        q = torch.randn(total_q, num_q_heads + 2 * num_kv_heads, head_dim).to(dtype)[:, :num_q_heads]
    else:
        q = torch.randn(total_q, num_q_heads, head_dim).to(dtype)
    cu = torch.tensor([0] + q_lens, dtype=torch.int32).cumsum(0, dtype=torch.int32)
    return Batch(q.to(DEVICE), k_cache.to(DEVICE), v_cache.to(DEVICE), block_table.to(DEVICE),
                 torch.tensor(kv_lens, dtype=torch.int32, device=DEVICE), cu.to(DEVICE))


def expected_output(batch: Batch, rope: RopeSpec | None, **kwargs) -> torch.Tensor:
    """The float64 reference on the same inputs."""
    cpu = lambda t: t.cpu()  # noqa: E731
    return reference.paged_attention(
        cpu(batch.q).double(), cpu(batch.k_cache).double(), cpu(batch.v_cache).double(), cpu(batch.block_table),
        cpu(batch.kv_lens), cpu(batch.cu_seqlens_q), rope, **kwargs)


def check(batch: Batch, rope: RopeSpec | None, **kwargs) -> torch.Tensor:
    """Run the kernel and compare with the reference at the tolerance of q's dtype; returns the output."""
    out = cattn.paged_attention(batch.q, batch.k_cache, batch.v_cache, batch.block_table, batch.kv_lens,
                                batch.cu_seqlens_q, rope, backend=BACKEND, **kwargs)
    kwargs.pop("out", None)
    assert out.dtype == batch.q.dtype and out.shape == batch.q.shape
    torch.testing.assert_close(out.double().cpu(), expected_output(batch, rope, **kwargs),
                               **TOLERANCES[batch.q.dtype])
    return out
