"""Index tensors of any stride: block_table, kv_lens, cu_seqlens_q and slot_mapping as strided views.

A strided view is built inside a wider tensor whose gaps hold *other valid* values (page ids of
other sequences, NaN pages, other lengths, other slots): a kernel that reads the gaps instead of
the view's elements computes something plausible but wrong, and the comparison shows it. Each call
is compared with the same call on contiguous copies (bit for bit: same kernel, same values) and
with the float64 reference, on both backends (Triton under TRITON_INTERPRET=1 on CPU;
CATTN_TEST_DEVICE=cuda runs the same tests on a GPU, where a gap-reading kernel writes stray memory).
"""
from __future__ import annotations

import math
import os

import pytest
import torch

import cattn
from cattn import RopeSpec, reference

BACKENDS = ["torch", "triton"]
DEVICE = torch.device(os.environ.get("CATTN_TEST_DEVICE", "cpu"))
HKV, GROUP, D, PAGE = 2, 3, 48, 5           # odd group, head_dim not a power of two, odd page size
ROPE = RopeSpec(1.0 / (10000.0 ** (torch.arange(0, D, 2).float() / D)))
FP32_TOL = dict(atol=5e-6, rtol=5e-6)
INDEX_NAMES = ("block_table", "kv_lens", "cu_seqlens_q")


def strided_view(t: torch.Tensor, gaps: torch.Tensor) -> torch.Tensor:
    """``t``'s values as a view with stride 2 (3 in dim 1) and a storage offset, in a tensor whose
    other elements come from ``gaps`` (broadcast): same shape, dtype and values, other memory."""
    gaps = gaps.to(t.device)
    if t.ndim == 1:
        wide = torch.empty(2 * t.shape[0] + 1, dtype=t.dtype, device=t.device)
        wide[:] = gaps[: wide.shape[0]] if gaps.numel() > 1 else gaps
        view = wide[1::2]
    else:
        wide = torch.empty(2 * t.shape[0], 3 * t.shape[1] + 1, dtype=t.dtype, device=t.device)
        wide[:] = gaps
        view = wide[::2, 1::3]
    view.copy_(t)
    assert not view.is_contiguous() and torch.equal(view, t)
    return view


def make_batch(q_lens: list[int], kv_lens: list[int]) -> dict:
    """Sequences on shuffled pages; two spare pages full of NaN; queries are the last q_len tokens."""
    pages_per_seq = [math.ceil(n / PAGE) for n in kv_lens]
    num_pages = sum(pages_per_seq) + 2
    k_cache = torch.full((num_pages, PAGE, HKV, D), float("nan"))
    v_cache = torch.full_like(k_cache, float("nan"))
    page_ids = torch.randperm(num_pages)
    block_table = torch.zeros(len(kv_lens), max(pages_per_seq) + 1, dtype=torch.int32)
    used = 0
    for b, (n, p) in enumerate(zip(kv_lens, pages_per_seq)):
        block_table[b, :p] = page_ids[used: used + p]
        block_table[b, p:] = page_ids[used]              # padding: a real page, never read past kv_len
        used += p
        tokens = torch.arange(n)
        k_cache[block_table[b, tokens // PAGE].long(), tokens % PAGE] = torch.randn(n, HKV, D)
        v_cache[block_table[b, tokens // PAGE].long(), tokens % PAGE] = torch.randn(n, HKV, D)
    batch = dict(q=torch.randn(sum(q_lens), HKV * GROUP, D), k_cache=k_cache, v_cache=v_cache,
                 block_table=block_table, kv_lens=torch.tensor(kv_lens, dtype=torch.int32),
                 cu_seqlens_q=torch.tensor([0] + q_lens).cumsum(0).to(torch.int32), nan_pages=page_ids[used:])
    return {name: t.to(DEVICE) for name, t in batch.items()}


def gaps_for(batch: dict, name: str) -> torch.Tensor:
    """Values a gap-reading kernel would find: NaN pages, other (valid) lengths and offsets."""
    if name == "block_table":
        return batch["nan_pages"][0].to(torch.int32)
    if name == "kv_lens":
        return torch.tensor(1, dtype=torch.int32)             # valid for every q_len <= 1, wrong for all
    cu = batch["cu_seqlens_q"]
    return cu.flip(0).repeat(3)                               # in range, in the wrong order


def attend(batch: dict, backend: str, **kwargs) -> torch.Tensor:
    return cattn.paged_attention(batch["q"], batch["k_cache"], batch["v_cache"], batch["block_table"],
                                 batch["kv_lens"], batch["cu_seqlens_q"], ROPE, backend=backend, **kwargs)


def expected(batch: dict) -> torch.Tensor:
    """The float64 reference on CPU, on the contiguous batch."""
    b = {name: t.cpu() for name, t in batch.items()}
    return reference.paged_attention(b["q"].double(), b["k_cache"].double(), b["v_cache"].double(),
                                     b["block_table"], b["kv_lens"], b["cu_seqlens_q"], ROPE)


SHAPES = {"extend": ([3, 1, 7], [14, 9, 7]), "decode": ([1, 1, 1], [12, 3, 16])}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("strided", [*INDEX_NAMES, "all"])
@pytest.mark.parametrize("shape", list(SHAPES))
def test_paged_attention_strided_index_views(backend, strided, shape):
    batch = make_batch(*SHAPES[shape])
    names = INDEX_NAMES if strided == "all" else (strided,)
    views = dict(batch, **{n: strided_view(batch[n], gaps_for(batch, n)) for n in names})
    out = attend(views, backend)
    torch.testing.assert_close(out, attend(batch, backend), atol=0, rtol=0)
    torch.testing.assert_close(out.double().cpu(), expected(batch), **FP32_TOL)


@pytest.mark.parametrize("backend", BACKENDS)
def test_strided_views_without_host_checks(backend):
    """check_indices=False (the hot path): the views are still made contiguous before the launch."""
    batch = make_batch([2, 5], [11, 5])
    views = dict(batch, **{n: strided_view(batch[n], gaps_for(batch, n)) for n in INDEX_NAMES})
    out = attend(views, backend, check_indices=False, max_q_len=5)
    torch.testing.assert_close(out, attend(batch, backend), atol=0, rtol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_column_major_table_and_broadcast_lengths(backend):
    """Other layouts a caller can hand over: a transposed (column-major) block table, an expanded
    (stride 0) kv_lens and int64 indices."""
    batch = make_batch([4, 4, 4], [10, 10, 10])
    views = dict(batch, block_table=batch["block_table"].long().t().contiguous().t(),
                 kv_lens=torch.tensor([10], device=DEVICE).expand(3),
                 cu_seqlens_q=strided_view(batch["cu_seqlens_q"].long(), torch.tensor(0)))
    assert views["block_table"].stride() == (1, 3) and views["kv_lens"].stride() == (0,)
    out = attend(views, backend)
    torch.testing.assert_close(out, attend(batch, backend), atol=0, rtol=0)
    torch.testing.assert_close(out.double().cpu(), expected(batch), **FP32_TOL)


@pytest.mark.parametrize("backend", BACKENDS)
def test_issue_repro_every_other_column(backend):
    """The issue's repro: a one-row block table taken as every other column of a zero tensor."""
    k_cache, v_cache = torch.randn(4, PAGE, HKV, D), torch.randn(4, PAGE, HKV, D)
    q = torch.randn(3, HKV * GROUP, D)
    kv_lens, cu = torch.tensor([2 * PAGE], dtype=torch.int32), torch.tensor([0, 3], dtype=torch.int32)
    w = torch.zeros(1, 4, dtype=torch.int32)
    w[:, ::2] = torch.tensor([[2, 3]])
    contiguous = torch.tensor([[2, 3]], dtype=torch.int32)
    want = reference.paged_attention(q.double(), k_cache.double(), v_cache.double(), contiguous, kv_lens, cu, ROPE)
    args = [t.to(DEVICE) for t in (q, k_cache, v_cache)]
    w, contiguous, kv_lens, cu = (t.to(DEVICE) for t in (w, contiguous, kv_lens, cu))
    out = cattn.paged_attention(*args, w[:, ::2], kv_lens, cu, ROPE, backend=backend)
    torch.testing.assert_close(out, cattn.paged_attention(*args, contiguous, kv_lens, cu, ROPE, backend=backend),
                               atol=0, rtol=0)
    torch.testing.assert_close(out.double().cpu(), want, **FP32_TOL)


@pytest.mark.parametrize("backend", BACKENDS)
def test_checks_read_the_views_values(backend):
    """A view whose own entries are out of range is refused, whatever its gaps hold; the gaps of a
    view whose entries are in range are neither checked nor read (here they name the page just past
    the pool: checked, they would be refused; read, they would give garbage)."""
    batch = make_batch([2], [10])
    bad = batch["block_table"].clone()
    bad[0, 1] = batch["k_cache"].shape[0]                     # the second page is past the pool
    with pytest.raises(ValueError, match="block_table entries used by kv_lens") as info:
        attend(dict(batch, block_table=strided_view(bad, torch.tensor(0, dtype=torch.int32))), backend)
    assert "block_table" in str(info.value)
    past_pool = strided_view(batch["block_table"], torch.tensor(batch["k_cache"].shape[0], dtype=torch.int32))
    torch.testing.assert_close(attend(dict(batch, block_table=past_pool), backend), attend(batch, backend),
                               atol=0, rtol=0)


# ---- write_kv ---------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("slots_dtype", [torch.int32, torch.int64], ids=str)
def test_write_kv_strided_slot_mapping(backend, slots_dtype):
    """Gaps hold other valid slots: a kernel reading them would write the wrong slots."""
    num_pages, num_tokens = 6, 11
    k, v = torch.randn(num_tokens, HKV, D, device=DEVICE), torch.randn(num_tokens, HKV, D, device=DEVICE)
    perm = torch.randperm(num_pages * PAGE).to(slots_dtype).to(DEVICE)
    slots = perm[:num_tokens].clone()
    slots[3] = -1                                            # a padding token among them
    view = strided_view(slots, perm.flip(0))
    caches = [torch.randn(num_pages, PAGE, HKV, D, device=DEVICE) for _ in range(2)]
    on_view, on_copy, by_reference = ([c.clone() for c in caches] for _ in range(3))
    cattn.write_kv(k, v, *on_view, view, backend=backend)
    cattn.write_kv(k, v, *on_copy, slots, backend=backend)
    reference.write_kv(k, v, *by_reference, slots)
    for got, copy, want in zip(on_view, on_copy, by_reference):
        assert torch.equal(got, copy) and torch.equal(got, want)


@pytest.mark.parametrize("backend", BACKENDS)
def test_write_kv_checks_the_views_values(backend):
    """A slot past the pool in the view is refused before anything is written; the gaps (other valid
    slots here: a kernel reading them would write there) are neither checked nor read."""
    k, v = torch.randn(3, HKV, D, device=DEVICE), torch.randn(3, HKV, D, device=DEVICE)
    caches = [torch.randn(2, PAGE, HKV, D, device=DEVICE) for _ in range(2)]
    before = [c.clone() for c in caches]
    bad = strided_view(torch.tensor([0, 2 * PAGE, 1], device=DEVICE), torch.tensor(0))
    with pytest.raises(ValueError, match=r"slot_mapping entries must be in \[-1, 10\)"):
        cattn.write_kv(k, v, *caches, bad, backend=backend)
    assert all(torch.equal(c, b) for c, b in zip(caches, before))
    fine = strided_view(torch.tensor([0, 7, 1], device=DEVICE), torch.tensor(9))
    cattn.write_kv(k, v, *caches, fine, backend=backend)
    reference.write_kv(k, v, *before, torch.tensor([0, 7, 1], device=DEVICE))
    assert all(torch.equal(c, b) for c, b in zip(caches, before))
