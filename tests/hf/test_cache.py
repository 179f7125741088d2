"""PagedCache as a transformers Cache: generate across calls, crop, truncation with renumbered positions, errors."""
import copy

import pytest
import torch
from transformers.cache_utils import DynamicCache

from cattn import apply_rope
from cattn.hf import CACHE_KWARG, PagedCache, apply_cattn, revert_cattn
from cattn.paged import PoolExhaustedError
from cattn.rope import RopeSpec

FP32 = dict(atol=2e-5, rtol=1e-4)


def greedy(model, ids, n, cache=None, **kwargs):
    extra = {} if cache is None else {CACHE_KWARG: cache}
    with torch.no_grad():
        return model.generate(ids, attention_mask=kwargs.pop("attention_mask", torch.ones_like(ids)),
                              max_new_tokens=n, min_new_tokens=n, do_sample=False, **extra, **kwargs)


def count_forward_tokens(model) -> list[int]:
    """Record the number of input positions of every forward call of ``model``."""
    seen = []
    model.get_decoder().register_forward_pre_hook(
        lambda module, args, kwargs: seen.append(kwargs["input_ids"].shape[1]), with_kwargs=True)
    return seen


def test_generate_twice_prefills_only_new_tokens_and_matches_stock(tiny_model):
    stock = tiny_model("qwen2")
    model = apply_cattn(copy.deepcopy(stock), page_size=4)
    seen = count_forward_tokens(model)
    cache = PagedCache(model, max_tokens=64)
    prompt = torch.randint(0, 256, (1, 9))
    first = greedy(model, prompt, 5, cache)
    assert torch.equal(first, greedy(stock, prompt, 5))
    assert seen == [9, 1, 1, 1, 1] and cache.num_tokens() == 13      # the last token is sampled, not fed

    follow_up = torch.cat([first, torch.randint(0, 256, (1, 6))], dim=1)
    seen.clear()
    second = greedy(model, follow_up, 4, cache)
    assert torch.equal(second, greedy(stock, follow_up, 4))
    assert seen[0] == follow_up.shape[1] - 13 == 7                        # only what the cache lacked


def test_generate_padded_batch_matches_stock(tiny_model):
    stock = tiny_model("llama")
    model = apply_cattn(copy.deepcopy(stock), page_size=4)
    ids = torch.randint(0, 256, (2, 8))
    mask = torch.ones_like(ids)
    ids[1, :3], mask[1, :3] = 257, 0
    got = greedy(model, ids, 5, PagedCache(model, batch_size=2, max_tokens=16), attention_mask=mask)
    assert torch.equal(got, greedy(stock, ids, 5, attention_mask=mask))


def test_crop_then_continue_matches_stock(tiny_model):
    stock = tiny_model("llama")
    model = apply_cattn(copy.deepcopy(stock), page_size=4)
    ids = torch.randint(0, 256, (1, 14))
    cache = PagedCache(model, max_tokens=32)
    with torch.no_grad():
        model(ids, **{CACHE_KWARG: cache})
        cache.crop(-5)                               # drop 5 tokens: a page and one more
        assert cache.num_tokens() == cache.get_seq_length() == 9
        assert cache.pool.num_free == cache.pool.num_pages - 3
        got = model(ids[:, 9:12], **{CACHE_KWARG: cache}).logits
        expected = stock(ids[:, :12]).logits[:, 9:]
    torch.testing.assert_close(got, expected, **FP32)


def test_truncate_one_layer_equals_recompute_from_scratch(tiny_model):
    """With one layer, K/V depend on the token alone, so after truncation attention over the kept cache
    must equal the stock model run from scratch on the kept tokens, positions renumbered from 0."""
    stock = tiny_model("llama", num_hidden_layers=1)
    model = apply_cattn(copy.deepcopy(stock), page_size=4)
    ids = torch.randint(0, 256, (1, 23))
    cache = PagedCache(model, max_tokens=32)
    with torch.no_grad():
        model(ids[:, :20], **{CACHE_KWARG: cache})
        dropped = cache.truncate(5, keep_first=3)              # rounded up to 8 tokens (whole pages)
        assert dropped == 8 and cache.num_tokens() == cache.get_seq_length() == 12
        got = model(ids[:, 20:], **{CACHE_KWARG: cache}).logits
        kept = torch.cat([ids[:, :3], ids[:, 11:]], dim=1)
        expected = stock(kept).logits[:, -3:]
    torch.testing.assert_close(got, expected, **FP32)


def test_truncate_equals_stock_over_kept_kv_at_renumbered_positions(tiny_model):
    """Deeper layers' K/V were computed with the dropped tokens in view: the decoupled-RoPE promise is
    that the kept K/V serve as they are, rotated at positions 0..n-1. The stock model, given exactly
    those K/V rotated at those positions, must produce the same logits."""
    stock = tiny_model("qwen3", num_hidden_layers=3)
    model = apply_cattn(copy.deepcopy(stock), page_size=4)
    ids = torch.randint(0, 256, (1, 26))
    cache = PagedCache(model, max_tokens=32)
    with torch.no_grad():
        model(ids[:, :22], **{CACHE_KWARG: cache})
        kept = 22 - cache.truncate(6, keep_first=2)
        k, v = cache.read(0, kept)
        got = model(ids[:, 22:], **{CACHE_KWARG: cache}).logits
        rope, positions = RopeSpec.from_model(stock), torch.arange(kept)
        reference = DynamicCache()
        for layer in range(k.shape[0]):
            reference.update(apply_rope(k[layer], positions, rope).transpose(0, 1)[None],
                             v[layer].transpose(0, 1)[None], layer)
        expected = stock(ids[:, 22:], **{CACHE_KWARG: reference}).logits
    torch.testing.assert_close(got, expected, **FP32)


def test_load_then_read_round_trips(tiny_model):
    model = apply_cattn(tiny_model("llama"), page_size=4)
    cache = PagedCache(model, max_tokens=16)
    k, v = torch.randn(2, 2, 7, 2, 16).unbind(0)
    cache.load(k, v)
    assert cache.num_tokens() == cache.get_seq_length() == 7
    got_k, got_v = cache.read(0, 7)
    assert torch.equal(got_k, k) and torch.equal(got_v, v)
    with pytest.raises(ValueError, match="num_kv_heads"):
        cache.load(torch.randn(2, 3, 1, 16), torch.randn(2, 3, 1, 16))
    with pytest.raises(ValueError, match="outside"):
        cache.read(3, 9)


def test_full_pool_raises_before_any_change(tiny_model):
    model = apply_cattn(tiny_model("llama"), page_size=4)
    cache = PagedCache(model, max_tokens=8)
    with pytest.raises(PoolExhaustedError, match="max_tokens=8"):
        with torch.no_grad():
            model(torch.randint(0, 256, (1, 9)), **{CACHE_KWARG: cache})
    assert cache.num_tokens() == cache.get_seq_length() == 0 and cache.pool.num_free == 2


def test_bad_arguments_and_unsupported_uses(tiny_model):
    stock = tiny_model("llama")
    with pytest.raises(ValueError, match="apply_cattn"):
        PagedCache(stock)
    model = apply_cattn(stock, page_size=4)
    for bad in (dict(batch_size=0), dict(max_tokens=0), dict(max_tokens=2.5)):
        with pytest.raises(ValueError):
            PagedCache(model, **bad)
    cache = PagedCache(model, batch_size=2, max_tokens=8)
    with pytest.raises(ValueError, match="batch_size 1"):
        cache.truncate(4)
    with pytest.raises(ValueError, match="2 rows"):
        greedy(model, torch.randint(0, 256, (1, 4)), 2, PagedCache(model, max_tokens=8), num_beams=2)
    revert_cattn(model)
    with pytest.raises(TypeError, match="apply_cattn"):
        with torch.no_grad():
            model(torch.randint(0, 256, (2, 3)), **{CACHE_KWARG: cache})


# ---- the host store through the hooks: layer-wise loading, per-layer saving ------------------------

def _key():
    from cattn.store import EntryKey
    return EntryKey("acme", "0123abcd", "chat")


def _history(model, ids):
    """K/V of ``ids`` as the patched model computes them, read back from a scratch cache."""
    cache = PagedCache(model, max_tokens=ids.shape[1])
    with torch.no_grad():
        model(ids, **{CACHE_KWARG: cache})
    return cache.read(0, ids.shape[1])


@pytest.mark.parametrize("store_kind", ["tiered", "memory"])
def test_layerwise_load_and_per_layer_save_match_stock(tiny_model, store_kind):
    from cattn.store import KVEntry, MemoryStore, TieredStore

    stock = tiny_model("llama3", num_hidden_layers=3)
    model = apply_cattn(copy.deepcopy(stock), page_size=4)
    ids = torch.randint(0, 256, (1, 16))
    k, v = _history(model, ids[:, :11])
    store = TieredStore(1 << 20) if store_kind == "tiered" else MemoryStore()
    key = _key()
    store.save(key, KVEntry(ids[0, :11], k, v))
    cache = PagedCache(model, max_tokens=24)
    cache.kv.fill_(float("nan"))
    source = store.acquire(key, 11) if store_kind == "tiered" else store.load(key, 11)
    cache.load_layerwise(source, preload=1)
    history_slots = cache.pages.slots(0, 11)
    loaded = [not cache.kv[layer, :, :, :].flatten(1, 2)[:, history_slots].isnan().any() for layer in range(3)]
    assert loaded == [True, False, False] and cache.get_seq_length() == 11

    seen = []                                 # per layer, when it waits: which layers hold their history
    wait = cache.wait_layer

    def spy(layer):
        seen.append([not cache.kv[i].flatten(1, 2)[:, history_slots].isnan().any() for i in range(3)])
        wait(layer)
    cache.wait_layer = spy
    cache.save_next_step(store, key, ids[0, 11:], 11)
    with torch.no_grad():
        got = model(ids[:, 11:], **{CACHE_KWARG: cache}).logits
        expected = stock(ids).logits[:, 11:]
    torch.testing.assert_close(got, expected, **FP32)
    assert seen == [[True, False, False], [True, False, False], [True, True, False]]   # one layer at a time
    assert cache.step_saved
    assert [f.result() for f in cache.finish()] == [None]
    stored = store.load(key)
    new_k, new_v = cache.read(11, 16)
    assert torch.equal(stored.token_ids, ids[0]) and torch.equal(stored.k[:, :11], k)
    assert torch.equal(stored.k[:, 11:], new_k) and torch.equal(stored.v[:, 11:], new_v)
    if store_kind == "tiered":
        stats = store.stats()
        token_bytes = 2 * 3 * 2 * 16 * 4
        assert stats["dram"]["bytes_in"] == 16 * token_bytes          # history once, then only the new tokens
        assert stats["transfer"]["loads"] == 1 and stats["transfer"]["bytes"] == 11 * token_bytes
        store.delete(key)
        assert store.stats()["dram"]["used_bytes"] == 0               # the lease was released


def test_generate_over_a_layerwise_load_and_decode_tokens_saved_at_the_end(tiny_model):
    from cattn.store import KVEntry, TieredStore

    stock = tiny_model("qwen2")
    model = apply_cattn(copy.deepcopy(stock), page_size=4)
    prompt = torch.randint(0, 256, (1, 13))
    k, v = _history(model, prompt[:, :9])
    store, key = TieredStore(1 << 20), _key()
    store.save(key, KVEntry(prompt[0, :9], k, v))
    cache = PagedCache(model, max_tokens=32)
    cache.load_layerwise(store.acquire(key), preload=0)
    cache.save_next_step(store, key, prompt[0, 9:], 9)
    out = greedy(model, prompt, 5, cache)
    assert torch.equal(out, greedy(stock, prompt, 5))
    cache.save_tokens(store, key, out[0, 13:17], 13, 13)
    assert all(f.result() is None for f in cache.finish())
    stored = store.load(key)
    assert torch.equal(stored.token_ids, out[0, :17])
    assert torch.equal(stored.k[:, 9:], cache.read(9, 17)[0])
    hidden, exposed = cache.load_seconds()
    assert exposed > 0 and hidden < exposed                          # preload=0: every layer waited for
    new, per_layer = cache.layer_seconds()
    assert new == 4 and per_layer > 0


def test_a_store_without_room_saves_nothing_and_the_step_still_runs(tiny_model):
    from cattn.store import TieredStore

    stock = tiny_model("llama")
    model = apply_cattn(copy.deepcopy(stock), page_size=4)
    store, key = TieredStore(4096, full_timeout_s=0.01), _key()       # less than 12 tokens' KV
    ids = torch.randint(0, 256, (1, 12))
    cache = PagedCache(model, max_tokens=16)
    cache.save_next_step(store, key, ids[0], 0)
    with torch.no_grad():
        got = model(ids, **{CACHE_KWARG: cache}).logits
        expected = stock(ids).logits
    torch.testing.assert_close(got, expected, **FP32)
    assert not cache.step_saved and cache.finish() == [] and store.lookup(key) is None


def test_layerwise_load_refuses_a_foreign_layout(tiny_model):
    from cattn.store import KVEntry

    model = apply_cattn(tiny_model("llama"), page_size=4)
    cache = PagedCache(model, max_tokens=16)
    with pytest.raises(ValueError, match="layout"):
        cache.load_layerwise(KVEntry(torch.arange(3), torch.randn(2, 3, 1, 16), torch.randn(2, 3, 1, 16)))
    with pytest.raises(ValueError, match="layout"):
        cache.load_layerwise(KVEntry(torch.arange(3), *torch.randn(2, 2, 3, 2, 16, dtype=torch.float64).unbind(0)))
    assert cache.num_tokens() == 0 and cache.pool.num_free == cache.pool.num_pages
