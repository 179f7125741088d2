"""Page pool, per-sequence bookkeeping, and truncation that keeps attention exact without moving KV."""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import cattn
from cattn import PagedSequences, PagePool, PoolExhaustedError, RopeSpec, reference

HKV, HQ, D = 2, 4, 16
ROPE = RopeSpec(1.0 / (10000.0 ** (torch.arange(0, D, 2).float() / D)))


# ---- PagePool ---------------------------------------------------------------------------------

def test_pool_allocates_distinct_pages_and_counts_free():
    pool = PagePool(8, page_size=4)
    a, b = pool.allocate(3), pool.allocate(5)
    assert sorted(a + b) == list(range(8)) and pool.num_free == 0
    pool.free(a)
    assert pool.num_free == 3
    assert sorted(pool.allocate(3)) == sorted(a)


def test_pool_exhaustion_is_a_clear_error_and_changes_nothing():
    pool = PagePool(4, page_size=16)
    pool.allocate(3)
    with pytest.raises(PoolExhaustedError, match=r"asked for 2 pages, 1 of 4 free"):
        pool.allocate(2)
    assert pool.num_free == 1 and len(pool.allocate(1)) == 1


def test_pool_rejects_double_free_and_foreign_pages():
    pool = PagePool(4)
    pages = pool.allocate(2)
    pool.free(pages[:1])
    with pytest.raises(ValueError, match="not allocated"):
        pool.free(pages[:1])
    with pytest.raises(ValueError, match="not allocated"):
        pool.free([3])              # never handed out
    assert pool.num_free == 3


@pytest.mark.parametrize("num_pages, page_size, name, exc", [
    (0, 16, "num_pages", ValueError), (-3, 16, "num_pages", ValueError), (4, 0, "page_size", ValueError),
    (4, -16, "page_size", ValueError), (True, 16, "num_pages", TypeError), (4, True, "page_size", TypeError),
    (4.0, 16, "num_pages", TypeError), (4, 16.0, "page_size", TypeError), (torch.tensor(4), 16, "num_pages", TypeError),
])
def test_pool_rejects_bad_sizes(num_pages, page_size, name, exc):
    with pytest.raises(exc, match=name):
        PagePool(num_pages, page_size)


def test_pool_takes_numpy_ints():
    np = pytest.importorskip("numpy")
    pool = PagePool(np.int64(4), page_size=np.int32(8))
    assert (pool.num_pages, pool.page_size) == (4, 8) and type(pool.page_size) is int
    pool.free(pool.allocate(np.int64(2))[:1])
    assert pool.num_free == 3


@pytest.mark.parametrize("n, exc", [(-1, ValueError), (True, TypeError), (1.0, TypeError), (torch.tensor(1), TypeError)])
def test_pool_allocate_rejects_bad_counts(n, exc):
    pool = PagePool(4)
    with pytest.raises(exc, match=r"\bn\b"):
        pool.allocate(n)
    assert pool.num_free == 4


@pytest.mark.parametrize("bad, exc, match", [
    ([1, 1], ValueError, "listed more than once"),       # the same page twice in one call
    ([1, 2], ValueError, "page 2 is not allocated"),      # the second was never handed out
    ([1, 4], ValueError, r"page 4 is out of range \[0, 4\)"),
    ([1, -1], ValueError, r"page -1 is out of range"),    # would index from the end of a table
    ([1, True], TypeError, "page ids must be ints, got bool"),
    ([1, 0.0], TypeError, "page ids must be ints, got float"),
])
def test_pool_free_is_all_or_nothing(bad, exc, match):
    """A bad list frees nothing: the good pages in it stay allocated and can be freed afterwards."""
    pool = PagePool(4)
    pages = pool.allocate(2)                  # [0, 1]
    with pytest.raises(exc, match=match) as info:
        pool.free(bad)
    assert "pages" in str(info.value)
    assert pool.num_free == 2 and sorted(pool.allocate(2)) == [2, 3]
    pool.free(pages)                          # 0 and 1 are still allocated, exactly once
    assert pool.num_free == 2


# ---- PagedSequences ---------------------------------------------------------------------------

def test_slots_follow_pages_and_block_table_pads():
    seqs = PagedSequences(PagePool(16, page_size=4))
    slots_a = seqs.append_slots("a", 6)           # pages 0, 1
    slots_b = seqs.append_slots("b", 3)           # page 2
    slots_a += seqs.append_slots("a", 3)          # fills page 1, then page 3
    pages_a = seqs.seqs["a"].pages
    assert pages_a == [0, 1, 3] and seqs.seqs["b"].pages == [2]
    assert slots_a == [pages_a[i // 4] * 4 + i % 4 for i in range(9)]
    assert slots_b == [8, 9, 10]
    assert seqs.kv_lens(["a", "b"]).tolist() == [9, 3]
    table = seqs.block_table(["b", "a"])
    assert table.dtype == torch.int32 and table.tolist() == [[2, 0, 0], [0, 1, 3]]
    seqs.release("a")
    assert seqs.pool.num_free == 15 and "a" not in seqs.seqs


def test_append_slots_exhaustion_changes_nothing():
    seqs = PagedSequences(PagePool(3, page_size=4))
    seqs.append_slots("a", 5)
    with pytest.raises(PoolExhaustedError):
        seqs.append_slots("a", 8)                 # needs 2 more pages, 1 free
    with pytest.raises(PoolExhaustedError):
        seqs.append_slots("new", 9)
    assert seqs.seqs["a"].num_tokens == 5 and len(seqs.seqs["a"].pages) == 2
    assert "new" not in seqs.seqs and seqs.pool.num_free == 1


@pytest.mark.parametrize("kwargs, exc, name", [
    ({"num_drop": -1}, ValueError, "num_drop"), ({"num_drop": 4, "keep_first": -2}, ValueError, "keep_first"),
    ({"num_drop": True}, TypeError, "num_drop"), ({"num_drop": 4, "keep_first": False}, TypeError, "keep_first"),
    ({"num_drop": 4.0}, TypeError, "num_drop"), ({"num_drop": torch.tensor(4)}, TypeError, "num_drop"),
])
def test_truncate_rejects_bad_counts(kwargs, exc, name):
    seqs = PagedSequences(PagePool(4, page_size=4))
    seqs.append_slots("a", 10)
    with pytest.raises(exc, match=name):
        seqs.truncate("a", **kwargs)
    assert seqs.seqs["a"].num_tokens == 10 and seqs.pool.num_free == 1


@pytest.mark.parametrize("n, exc", [(-1, ValueError), (True, TypeError), (2.0, TypeError), (torch.tensor(2), TypeError)])
def test_append_slots_rejects_bad_counts(n, exc):
    seqs = PagedSequences(PagePool(4, page_size=4))
    seqs.append_slots("a", 3)
    with pytest.raises(exc, match=r"\bn\b"):
        seqs.append_slots("a", n)
    with pytest.raises(exc, match=r"\bn\b"):
        seqs.append_slots("new", n)
    assert seqs.seqs["a"].num_tokens == 3 and "new" not in seqs.seqs and seqs.pool.num_free == 3


# ---- truncation equivalence -------------------------------------------------------------------

class Conversation:
    """One sequence (and a neighbour interleaved with it, so its pages are not contiguous) in a
    paged cache, with the logical pre-RoPE K/V of every token kept aside as the ground truth."""

    def __init__(self, page_size: int, num_pages: int, dtype=torch.float32):
        self.seqs = PagedSequences(PagePool(num_pages, page_size))
        shape = (num_pages, page_size, HKV, D)
        self.k_cache, self.v_cache = torch.randn(shape, dtype=dtype), torch.randn(shape, dtype=dtype)
        self.k, self.v = torch.empty(0, HKV, D, dtype=dtype), torch.empty(0, HKV, D, dtype=dtype)

    def append(self, n: int, neighbour: int = 0) -> None:
        k, v = torch.randn(n, HKV, D, dtype=self.k.dtype), torch.randn(n, HKV, D, dtype=self.k.dtype)
        slots = torch.tensor(self.seqs.append_slots("s", n), dtype=torch.int32)
        cattn.write_kv(k, v, self.k_cache, self.v_cache, slots, backend="torch")
        self.k, self.v = torch.cat((self.k, k)), torch.cat((self.v, v))
        if neighbour:
            self.seqs.append_slots(("other", self.k.shape[0]), neighbour)

    def truncate(self, num_drop: int, keep_first: int) -> int:
        dropped = self.seqs.truncate("s", num_drop, keep_first, caches=(self.k_cache, self.v_cache))
        n, keep_first = self.k.shape[0], min(keep_first, self.k.shape[0])
        keep = torch.cat((torch.arange(keep_first), torch.arange(keep_first + dropped, n)))
        self.k, self.v = self.k[keep], self.v[keep]
        return dropped


def attention_from_scratch(k: torch.Tensor, v: torch.Tensor, q: torch.Tensor, page_size: int) -> torch.Tensor:
    """float64 reference over kept K/V laid out afresh in pages 0, 1, ... (positions 0..n-1)."""
    n = k.shape[0]
    num_pages = -(-n // page_size)
    k_cache = torch.zeros(num_pages * page_size, HKV, D, dtype=torch.float64)
    v_cache = torch.zeros_like(k_cache)
    k_cache[:n], v_cache[:n] = k.double(), v.double()
    block_table = torch.arange(num_pages, dtype=torch.int32)[None]
    return reference.paged_attention(
        q.double(), k_cache.view(num_pages, page_size, HKV, D), v_cache.view(num_pages, page_size, HKV, D),
        block_table, torch.tensor([n], dtype=torch.int32), torch.tensor([0, q.shape[0]], dtype=torch.int32), ROPE)


def changed_pages(before: torch.Tensor, after: torch.Tensor) -> list[int]:
    return (before != after).flatten(1).any(1).nonzero().flatten().tolist()


# (page_size, tokens, num_drop, keep_first): aligned and unaligned drops and prefixes
TRUNCATIONS = [
    (16, 100, 32, 0),      # page-aligned drop, no sink
    (16, 100, 20, 0),      # drop rounded up to 32
    (16, 100, 20, 16),     # page-aligned sink
    (16, 100, 33, 4),      # sink ends mid-page: its tail moves into the cut page
    (5, 61, 12, 7),        # non-power-of-two page size, unaligned everything
    (5, 61, 7, 3),
    (16, 40, 100, 4),      # drop more than there is: only the sink survives
]


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("page_size, tokens, num_drop, keep_first", TRUNCATIONS)
def test_truncation_equals_recompute_from_scratch(backend, page_size, tokens, num_drop, keep_first):
    conv = Conversation(page_size, num_pages=64)
    for chunk in (tokens // 3, tokens // 3, tokens - 2 * (tokens // 3)):
        conv.append(chunk, neighbour=page_size + 1)
    pages_before = list(conv.seqs.seqs["s"].pages)
    k_before, v_before = conv.k_cache.clone(), conv.v_cache.clone()

    dropped = conv.truncate(num_drop, keep_first)

    expected_drop = min(-(-num_drop // page_size) * page_size, tokens - keep_first)
    assert dropped == expected_drop
    assert conv.seqs.seqs["s"].num_tokens == tokens - dropped == conv.k.shape[0]
    moved = changed_pages(k_before, conv.k_cache)
    assert moved == changed_pages(v_before, conv.v_cache) and len(moved) <= 1
    if keep_first % page_size and dropped < tokens - keep_first:
        # the sink's partial page moved into the page at the cut; nothing else changed
        cut_page = pages_before[(keep_first + dropped) // page_size]
        assert moved == [cut_page]
        assert torch.equal(conv.k_cache[cut_page, keep_first % page_size:], k_before[cut_page, keep_first % page_size:])
    else:
        assert moved == []
    assert set(conv.seqs.seqs["s"].pages) <= set(pages_before)

    conv.append(3)                                  # the next turn: 3 new tokens after the cut
    n = conv.k.shape[0]
    q = torch.randn(3, HQ, D)
    seq_ids = ["s"]
    out = cattn.paged_attention(q, conv.k_cache, conv.v_cache, conv.seqs.block_table(seq_ids),
                                conv.seqs.kv_lens(seq_ids), torch.tensor([0, 3], dtype=torch.int32), ROPE,
                                backend=backend)
    expected = attention_from_scratch(conv.k, conv.v, q, page_size)
    assert n == tokens - dropped + 3
    torch.testing.assert_close(out.double(), expected, atol=2e-5, rtol=2e-5)


@settings(derandomize=True, max_examples=40, deadline=None)
@given(page_size=st.sampled_from([3, 4, 16]), tokens=st.integers(1, 70), num_drop=st.integers(0, 80),
       keep_first=st.integers(0, 20))
def test_truncation_bookkeeping_fuzz(page_size, tokens, num_drop, keep_first):
    """Any truncation: the kept tokens' K/V are exactly what the cache serves, in order, and the
    pool gets back every page the sequence no longer uses."""
    conv = Conversation(page_size, num_pages=48)
    conv.append(tokens, neighbour=2)
    free_before = conv.seqs.pool.num_free
    k_before = conv.k_cache.clone()
    pages_before = len(conv.seqs.seqs["s"].pages)

    dropped = conv.truncate(num_drop, keep_first)

    kept = conv.seqs.seqs["s"]
    assert kept.num_tokens == conv.k.shape[0] == tokens - dropped
    assert dropped >= min(num_drop, max(tokens - keep_first, 0))
    assert len(kept.pages) == -(-kept.num_tokens // page_size)
    assert conv.seqs.pool.num_free == free_before + pages_before - len(kept.pages)
    assert len(changed_pages(k_before, conv.k_cache)) <= 1
    served = reference.gather_kv(conv.k_cache, torch.tensor(kept.pages or [0]), kept.num_tokens)
    assert torch.equal(served, conv.k)
