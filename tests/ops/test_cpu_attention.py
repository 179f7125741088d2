"""The CPU path built for speed (`cattn.cpu_attention`, what ``backend="auto"`` runs on CPU) against the
float64 oracle, on the adversarial batches of the kernel tests: fp32 and bf16, GQA, prefill, extend and
decode mixed, every rope kind (partial, gptj, scaled, longrope on both sides of its switch), sliding
windows, softcapping (which falls back to the reference), non-causal, and an output buffer. Then the
working copy the patched model's CPU layers keep across steps (`cattn.working_kv`), step after step over a
paged cache: the same dtypes, rope kinds and windows, rows of different lengths, longrope rows crossing
their switch, truncation, growth and a stale stamp."""
import pytest
import torch

import cattn
from cattn import cpu_attention, reference, working_kv
from cattn.paged import PagedSequences, PagePool
from cattn.working_kv import StepLens, WorkingKV
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


# ---- the working copy (`cattn.working_kv`): a CPU layer's rotated K and V kept across steps ---------------------

class Pages:
    """A paged cache of ``batch`` rows in a NaN-filled pool whose free pages come out shuffled, filled step by
    step as a model would: each step's new pre-RoPE K/V are written, then attended."""

    def __init__(self, batch: int, *, num_kv_heads: int, group: int, head_dim: int, page_size: int, dtype,
                 num_pages: int = 96):
        self.pool = PagePool(num_pages, page_size)
        taken = self.pool.allocate(num_pages)
        self.pool.free([taken[i] for i in torch.randperm(num_pages).tolist()])
        self.seqs = PagedSequences(self.pool)
        shape = (num_pages, page_size, num_kv_heads, head_dim)
        self.k, self.v = torch.full(shape, float("nan"), dtype=dtype), torch.full(shape, float("nan"), dtype=dtype)
        self.rows, self.num_q_heads, self.dtype = list(range(batch)), num_kv_heads * group, dtype
        for row in self.rows:
            self.seqs.append_slots(row, 0)

    def step(self, q_lens: list[int]):
        """Write ``q_lens[b]`` new tokens per row; returns q, k_new, v_new and the batch description."""
        slots = [s for row, n in zip(self.rows, q_lens) for s in self.seqs.append_slots(row, n)]
        k_new, v_new = (torch.randn(len(slots), *self.k.shape[2:]).to(self.dtype) for _ in range(2))
        reference.write_kv(k_new, v_new, self.k, self.v, torch.tensor(slots))
        q = torch.randn(len(slots), self.num_q_heads, self.k.shape[3]).to(self.dtype)
        cu = torch.tensor([0, *q_lens]).cumsum(0).int()
        return q, k_new, v_new, self.seqs.block_table(self.rows), self.seqs.kv_lens(self.rows), cu


def check_working(pages: Pages, steps, rope, *, stamps=None, edit=None, **kwargs):
    """Run ``steps`` (per step, each row's new tokens) through one `WorkingKV`, each against the float64 oracle
    over the pages; ``edit(step_index)`` may change the pages (its stamp bumps). Returns what it kept per step."""
    working, stamp, kept = WorkingKV(), 0, []
    for i, q_lens in enumerate(steps):
        if edit is not None and edit(i):
            stamp += 1
        q, k_new, v_new, block_table, kv_lens, cu = pages.step(q_lens)
        lens = StepLens.of(kv_lens.tolist(), q_lens)
        got = working.attend(q, k_new, v_new, pages.k, pages.v, block_table, rope, lens,
                             sm_scale=q.shape[2] ** -0.5, stamp=stamp, **kwargs)
        want = reference.paged_attention(q.double(), pages.k.double(), pages.v.double(), block_table, kv_lens, cu,
                                         rope, **kwargs)
        assert got.dtype == q.dtype and got.shape == q.shape
        err = ((got.double() - want).abs() / (1 + want.abs())).max().item()
        assert err <= TOLERANCES[q.dtype], (i, err)
        kept.append(working.held)
    return kept


# prefill, decodes, an extend, decodes; rows of equal and of different lengths (padding in the layout)
STEPS = {"uniform": [[9, 9], [1, 1], [1, 1], [4, 4], [1, 1]],
         "ragged": [[5, 12, 1], [1, 1, 1], [1, 1, 1], [6, 1, 3], [1, 1, 1], [0, 1, 1]],
         "one row": [[20], [1], [1], [1], [7], [1]]}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("rope_name", list(ROPES))
@pytest.mark.parametrize("steps", list(STEPS))
def test_working_copy_over_steps_equals_the_oracle(dtype, rope_name, steps):
    pages = Pages(len(STEPS[steps][0]), num_kv_heads=2, group=3, head_dim=32, page_size=4, dtype=dtype)
    kept = check_working(pages, STEPS[steps], ROPES[rope_name](32))
    assert kept[0] == () and all(kept[1:])       # a prefill keeps nothing; every later step keeps its lengths


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("window", [1, 3, 10])
@pytest.mark.parametrize("causal", [True, False])
def test_working_copy_with_sliding_windows_causal_or_not(dtype, window, causal):
    pages = Pages(3, num_kv_heads=1, group=4, head_dim=16, page_size=4, dtype=dtype)
    check_working(pages, STEPS["ragged"], default_rope(16), sliding_window=window, causal=causal)


def test_working_copy_crosses_longrope_switch_and_rebuilds():
    pages = Pages(2, num_kv_heads=2, group=2, head_dim=16, page_size=4, dtype=torch.float32)
    rope = longrope(16, original_max_position=12)
    check_working(pages, [[10, 8], [1, 1], [1, 1], [1, 1], [1, 1], [1, 1], [3, 1]], rope)  # rows cross at steps 3, 5


@pytest.mark.parametrize("keep_first", [0, 3, 8])
def test_working_copy_after_truncation_is_rebuilt_from_the_pages(keep_first):
    """Truncation renumbers the kept tokens from 0: the copy, rotated at the old positions, must not be used."""
    pages = Pages(1, num_kv_heads=2, group=3, head_dim=32, page_size=4, dtype=torch.float32)

    def truncate(i):
        if i in (3, 5):
            pages.seqs.truncate(0, 6, keep_first, caches=[pages.k, pages.v])
            return True
        return False

    kept = check_working(pages, [[30], [1], [1], [1], [1], [2], [1]], default_rope(32, "gptj"), edit=truncate)
    assert kept[3] < kept[2]


def test_working_copy_grows_and_keeps_what_it_held(monkeypatch):
    monkeypatch.setattr(working_kv, "HEADROOM", 2)
    pages = Pages(2, num_kv_heads=1, group=2, head_dim=16, page_size=4, dtype=torch.float32)
    check_working(pages, [[3, 5], [1, 1], [4, 4], [1, 1], [1, 1], [9, 2], [1, 1]], default_rope(16))


def test_a_stale_stamp_rebuilds_the_copy():
    pages = Pages(1, num_kv_heads=1, group=2, head_dim=16, page_size=4, dtype=torch.float32)
    working = WorkingKV()
    for q_lens, stamp in (([5], 0), ([1], 0)):
        q, k_new, v_new, block_table, kv_lens, cu = pages.step(q_lens)
        working.attend(q, k_new, v_new, pages.k, pages.v, block_table, default_rope(16),
                       StepLens.of(kv_lens.tolist(), q_lens), sm_scale=0.25, stamp=stamp)
    pages.k.view(-1, 1, 16)[pages.seqs.block_table([0])[0, 0].item() * 4] += 1.0    # an edit the copy cannot see
    q, k_new, v_new, block_table, kv_lens, cu = pages.step([1])
    lens = StepLens.of(kv_lens.tolist(), [1])
    args = (q, k_new, v_new, pages.k, pages.v, block_table, default_rope(16), lens)
    want = reference.paged_attention(q.double(), pages.k.double(), pages.v.double(), block_table, kv_lens, cu,
                                     default_rope(16), sm_scale=0.25)
    stale = working.attend(*args, sm_scale=0.25, stamp=0)
    working.held = lens.past                  # (attend moved it on; put it back for the second call)
    fresh = working.attend(*args, sm_scale=0.25, stamp=1)
    assert not torch.allclose(stale.double(), want, atol=1e-4)
    torch.testing.assert_close(fresh.double(), want, atol=2e-6, rtol=2e-6)
