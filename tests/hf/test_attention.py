"""Patched tiny models of every supported family give the stock model's logits: prefill, extend, decode, batches."""
import copy

import pytest
import torch

from cattn.hf import CACHE_KWARG, PagedCache, apply_cattn

FAMILIES = ["llama", "llama3", "mistral", "qwen2", "qwen3"]
FP32 = dict(atol=2e-5, rtol=1e-4)   # fp32 end to end; the paths differ only in summation order
PAGE = 4                            # small pages: every call crosses page boundaries


def patched_copy(stock, **kwargs):
    return apply_cattn(copy.deepcopy(stock), page_size=PAGE, **kwargs)


def forward(model, ids, cache, attention_mask=None):
    with torch.no_grad():
        return model(ids, attention_mask=attention_mask, **{CACHE_KWARG: cache}).logits


@pytest.mark.parametrize("family", FAMILIES)
def test_prefill_extend_decode_match_stock(tiny_model, family):
    stock = tiny_model(family)
    model = patched_copy(stock)
    ids = torch.randint(0, 256, (1, 23))
    with torch.no_grad():
        expected = stock(ids).logits
    cache = PagedCache(model, max_tokens=32)
    chunks = [(0, 13), (13, 21), (21, 22), (22, 23)]          # prefill, extend over history, two decodes
    got = torch.cat([forward(model, ids[:, a:b], cache) for a, b in chunks], dim=1)
    torch.testing.assert_close(got, expected, **FP32)
    assert cache.num_tokens() == 23 and cache.get_seq_length() == 23


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3"])
def test_batch_of_two_lengths_matches_stock(tiny_model, family):
    """Row 1 is left-padded, as generate pads a batch; each row must equal the stock model run alone."""
    stock = tiny_model(family)
    model = patched_copy(stock)
    lens, width = (11, 6), 11
    seqs = [torch.randint(0, 256, (1, n + 3)) for n in lens]       # prompt, then 2 extend + 1 decode tokens
    ids = torch.full((2, width), 257)
    mask = torch.zeros(2, width, dtype=torch.long)
    for row, n in enumerate(lens):
        ids[row, width - n:], mask[row, width - n:] = seqs[row][0, :n], 1
    cache = PagedCache(model, batch_size=2, max_tokens=16)
    prefill = forward(model, ids, cache, mask)
    steps = [(slice(-3, -1), 2), (slice(-1, None), 1)]
    later = []
    for cols, n in steps:
        mask = torch.cat([mask, torch.ones(2, n, dtype=torch.long)], dim=1)
        later.append(forward(model, torch.cat([s[:, cols] for s in seqs]), cache, mask))
    for row, n in enumerate(lens):
        with torch.no_grad():
            expected = stock(seqs[row]).logits[0]
        got = torch.cat([prefill[row, width - n:], later[0][row], later[1][row]])
        torch.testing.assert_close(got, expected, **FP32)
    assert [cache.num_tokens(r) for r in range(2)] == [n + 3 for n in lens]


def test_padding_positions_are_never_written(tiny_model):
    model = patched_copy(tiny_model("llama"))
    cache = PagedCache(model, batch_size=2, max_tokens=8)
    mask = torch.tensor([[1, 1, 1, 1], [0, 0, 0, 1]])
    out = forward(model, torch.randint(0, 256, (2, 4)), cache, mask)
    assert [cache.num_tokens(0), cache.num_tokens(1)] == [4, 1]
    assert torch.isfinite(out).all()


def test_triton_backend_matches_stock(tiny_model):
    """The same model through the Triton kernels (interpreted on CPU): prefill, extend and decode."""
    stock = tiny_model("qwen3")
    model = patched_copy(stock, backend="triton")
    ids = torch.randint(0, 256, (1, 10))
    with torch.no_grad():
        expected = stock(ids).logits
    cache = PagedCache(model, max_tokens=16)
    got = torch.cat([forward(model, ids[:, a:b], cache) for a, b in [(0, 6), (6, 9), (9, 10)]], dim=1)
    torch.testing.assert_close(got, expected, **FP32)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_sequences_longer_than_the_sliding_window_match_stock(tiny_model, backend):
    """Mistral slides its window over every layer: prefill, extend and decode past it."""
    stock = tiny_model("mistral", sliding_window=5)
    model = patched_copy(stock, backend=backend)
    ids = torch.randint(0, 256, (1, 17))
    with torch.no_grad():
        expected = stock(ids).logits
    cache = PagedCache(model, max_tokens=24)
    got = torch.cat([forward(model, ids[:, a:b], cache) for a, b in [(0, 9), (9, 16), (16, 17)]], dim=1)
    torch.testing.assert_close(got, expected, **FP32)


def test_without_a_paged_cache_the_stock_modules_run_with_cattn_attention(tiny_model, monkeypatch):
    """No cache: the stock module runs and calls cattn's attention function (the 'cattn' implementation)."""
    import cattn.hf.dense as dense

    stock = tiny_model("llama")
    model = patched_copy(stock)
    calls = []
    original = dense.paged_attention
    monkeypatch.setattr(dense, "paged_attention", lambda *a, **k: calls.append(1) or original(*a, **k))
    ids = torch.randint(0, 256, (1, 4))
    with torch.no_grad():
        torch.testing.assert_close(model(ids, use_cache=False).logits, stock(ids).logits, **FP32)
    assert len(calls) == 2                                  # one per layer


def test_triton_backend_without_a_paged_cache_matches_stock_on_a_padded_batch(tiny_model):
    """The dense path (pages of one token, block tables listing real columns) through the Triton kernels."""
    stock = tiny_model("qwen2")
    model = patched_copy(stock, backend="triton")
    ids = torch.randint(0, 256, (2, 7))
    mask = torch.ones_like(ids)
    mask[0, :2] = 0
    with torch.no_grad():
        got = model(ids, attention_mask=mask, use_cache=False).logits
        expected = stock(ids, attention_mask=mask).logits
    real = mask.bool()
    torch.testing.assert_close(got[real], expected[real], **FP32)


def test_4d_mask_is_refused(tiny_model):
    model = patched_copy(tiny_model("llama"))
    cache = PagedCache(model, max_tokens=8)
    with pytest.raises(ValueError, match="2D padding mask"):
        forward(model, torch.randint(0, 256, (1, 3)), cache, torch.zeros(1, 1, 3, 3))


def test_cpu_decode_keeps_a_working_copy_that_edits_invalidate(tiny_model):
    """On CPU each layer keeps its rotated K and V across decode steps (`cattn.working_kv`); a prefill keeps
    nothing, truncation and crop make it stale and the next step rebuilds it from the pages. Step by step the
    logits equal the same model on the plain reference (backend="torch")."""
    stock = tiny_model("llama")
    model, oracle = patched_copy(stock), patched_copy(stock, backend="torch")
    caches = [PagedCache(m, max_tokens=64) for m in (model, oracle)]
    ids = torch.randint(0, 256, (1, 60))
    layers = range(model.config.num_hidden_layers)

    def step(a, b):
        got, want = (forward(m, ids[:, a:b], c) for m, c in zip((model, oracle), caches))
        torch.testing.assert_close(got, want, **FP32)

    step(0, 30)
    assert caches[0].working_nbytes == 0
    for t in range(30, 33):
        step(t, t + 1)
    assert all(caches[0].working_kv(layer).held == (33,) for layer in layers) and caches[0].working_nbytes > 0
    for edit in (lambda c: c.truncate(9, keep_first=5), lambda c: c.crop(-3)):
        for cache in caches:
            edit(cache)
        n = caches[0].num_tokens()
        step(40, 41)
        assert caches[0].working_kv(0).held == (n + 1,)
        step(41, 45)                                       # an extend appends to the copy
        step(45, 46)
