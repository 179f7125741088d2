"""Sliding-window layers keep only what their window reaches (`cattn.hf.window`), and the model still
equals stock: decode far past the window, beams reordering rows, padded batches, crop and truncation."""
import copy

import pytest
import torch

from cattn.hf import CACHE_KWARG, PagedCache, apply_cattn
from cattn.paged import HOLE
from cattn.store import EntryKey, MemoryStore

FP32 = dict(atol=3e-5, rtol=1e-4)
PAGE = 4
WINDOW = 6


def patched(stock):
    return apply_cattn(copy.deepcopy(stock), page_size=PAGE)


def held_bound(q_len: int) -> int:
    """Tokens a sliding layer may hold after a step of ``q_len`` new tokens: the window's reach back
    from the step's first token (rounded down to a page) and the step itself."""
    return (WINDOW - 1) + (PAGE - 1) + q_len


@pytest.mark.parametrize("family", ["mistral", "gemma2"])
def test_decoding_far_past_the_window_holds_only_the_window_and_equals_stock(tiny_model, family):
    """Mistral slides every layer, Gemma 2 every other one: the global layers keep all tokens, the
    sliding ones at most the window plus a page, step after step, with logits equal to stock."""
    stock = tiny_model(family, sliding_window=WINDOW)
    model = patched(stock)
    ids = torch.randint(0, 256, (1, 40))
    with torch.no_grad():
        expected = stock(ids).logits
    cache = PagedCache(model, max_tokens=48)
    assert cache.window is not None and cache.window.window == WINDOW
    global_layers = [i for i, w in enumerate(model.config.layer_types if family == "gemma2" else [])
                     if w == "full_attention"]
    got = []
    with torch.no_grad():
        for a, b in [(0, 9), (9, 16), *((t, t + 1) for t in range(16, 40))]:
            got.append(model(ids[:, a:b], **{CACHE_KWARG: cache}).logits)
            held = cache.num_tokens() - cache.first_held()
            assert held <= held_bound(b - a), (b, held)
            pages = cache.window.seqs.seqs[0].pages
            assert sum(p != HOLE for p in pages) * PAGE <= held_bound(b - a) + PAGE
    torch.testing.assert_close(torch.cat(got, dim=1), expected, **FP32)
    assert cache.first_held() >= 40 - held_bound(1)
    # The window pool never grew past its first size, while the main pool holds every token.
    assert cache.window.pool.num_pages == 1 + -(-(WINDOW + PAGE) // PAGE) + 1
    assert cache.kv.shape[0] == len(global_layers) and cache.num_tokens() == 40
    if global_layers:
        k, _ = cache.read(cache.first_held(), 40)
        assert k.shape[1] == 40 - cache.first_held()


def test_a_long_prefill_grows_the_window_pool_then_gives_it_back(tiny_model):
    stock = tiny_model("mistral", sliding_window=WINDOW)
    model = patched(stock)
    ids = torch.randint(0, 256, (1, 30))
    cache = PagedCache(model, max_tokens=40)
    with torch.no_grad():
        got = [model(ids[:, :27], **{CACHE_KWARG: cache}).logits]
        assert cache.window.pool.num_pages > 27 // PAGE        # the step needed all of its tokens at once
        for t in range(27, 30):
            got.append(model(ids[:, t:t + 1], **{CACHE_KWARG: cache}).logits)
        expected = stock(ids).logits
    torch.testing.assert_close(torch.cat(got, dim=1), expected, **FP32)
    assert cache.window.pool.num_free >= cache.window.pool.num_pages - 1 - -(-held_bound(1) // PAGE) - 1


@pytest.mark.parametrize("kwargs", [dict(num_beams=3), dict(num_beams=2, num_return_sequences=2),
                                    dict(do_sample=True, top_k=5, num_return_sequences=2)])
def test_generate_past_the_window_with_beams_and_padding_equals_stock(tiny_model, kwargs):
    """Beam search reorders rows (window pages included) on a left-padded batch of Gemma 2."""
    stock = tiny_model("gemma2", sliding_window=WINDOW)
    model = patched(stock)
    ids = torch.randint(0, 256, (2, 9))
    mask = torch.ones_like(ids)
    ids[1, :3], mask[1, :3] = 257, 0
    args = dict(attention_mask=mask, max_new_tokens=12, min_new_tokens=12, **kwargs)
    with torch.no_grad():
        torch.manual_seed(0)
        out = model.generate(ids, return_dict_in_generate=True, **args)
        torch.manual_seed(0)
        assert torch.equal(out.sequences, stock.generate(ids, **args))
    cache = getattr(out, CACHE_KWARG)
    assert cache.window is not None and all(cache.first_held(r) > 0 for r in range(cache.batch_size))


def test_crop_and_truncate_refuse_to_bring_given_back_tokens_into_the_window(tiny_model):
    """What is allowed gives what a cache keeping every token gives; what is not is refused unchanged."""
    model = patched(tiny_model("mistral", sliding_window=WINDOW))
    caches = [PagedCache(model, max_tokens=40), PagedCache(model, max_tokens=40, window_pages=False)]
    ids = torch.randint(0, 256, (1, 22))

    def step(a, b):
        with torch.no_grad():
            return [model(ids[:, a:b], **{CACHE_KWARG: c}).logits for c in caches]

    step(0, 20)
    step(20, 21)
    cache = caches[0]
    held = cache.first_held()
    assert held == 12                    # the step at 20 reaches back to 15: pages [0, 12) went back
    with pytest.raises(ValueError, match="crop: the sliding layers gave back"):
        cache.crop(held + WINDOW - 3)
    for c in caches:
        c.crop(-1)                       # one token back: still inside what is held
    assert cache.num_tokens() == 20
    with pytest.raises(ValueError, match="keep_first: the sliding layers gave back"):
        cache.truncate(12, keep_first=4)  # the first 4 would come back into the window of 6
    assert cache.num_tokens() == 20 and cache.first_held() == held    # refused before any change
    assert [c.truncate(8, keep_first=4) for c in caches] == [8, 8]   # the first 4 stay out of the window
    windowed, full = step(20, 22)
    torch.testing.assert_close(windowed, full, **FP32)


def test_a_history_saved_and_loaded_by_kind_continues_as_if_every_token_were_kept(tiny_model):
    """Global layers saved whole, sliding layers their window only (`save_window`); a new cache loads
    both (`load_layerwise(..., window=)`) and the next steps equal a cache that kept everything."""
    model = patched(tiny_model("gemma2", sliding_window=WINDOW))
    ids = torch.randint(0, 256, (1, 30))
    store, key, wkey = MemoryStore(), EntryKey("t", "0" * 16, "s"), EntryKey("t", "1" * 16, "s")
    first = PagedCache(model, max_tokens=32)
    full = PagedCache(model, max_tokens=32, window_pages=False)
    with torch.no_grad():
        for c in (first, full):
            model(ids[:, :20], **{CACHE_KWARG: c})
            model(ids[:, 20:21], **{CACHE_KWARG: c})
    first.save_tokens(store, key, ids[0, :21], 0, 0)
    start = first.save_window(store, wkey, ids[0, :21])
    assert store.load(key).k.shape[:2] == (1, 21)            # the global layer, every token
    tail = store.load(wkey)
    assert tail.k.shape[0] == 1 and tail.num_tokens == 21 - start <= WINDOW - 1 + PAGE - 1
    again = PagedCache(model, max_tokens=32)
    with pytest.raises(ValueError, match="window: the sliding layers' last tokens"):
        again.load_layerwise(store.load(key))
    with pytest.raises(ValueError, match="window of 6 needs the last 5"):
        again.load_layerwise(store.load(key), window=store.load(wkey, 3))
    again.load_layerwise(store.load(key), window=tail)
    with torch.no_grad():
        got = [model(ids[:, 21:25], **{CACHE_KWARG: again}).logits, model(ids[:, 25:26], **{CACHE_KWARG: again}).logits]
        want = [model(ids[:, 21:25], **{CACHE_KWARG: full}).logits, model(ids[:, 25:26], **{CACHE_KWARG: full}).logits]
    again.finish()
    torch.testing.assert_close(torch.cat(got, 1), torch.cat(want, 1), **FP32)


def test_store_streaming_refusals_say_what_to_do(tiny_model):
    key = EntryKey("t", "0" * 16, "s")
    every_layer_slides = PagedCache(patched(tiny_model("mistral", sliding_window=WINDOW)), max_tokens=16)
    with pytest.raises(ValueError, match="every layer of this model slides.*window_pages=False"):
        every_layer_slides.save_next_step(MemoryStore(), key, torch.arange(3), 0)
    model = patched(tiny_model("gemma2", sliding_window=WINDOW))
    cache = PagedCache(model, max_tokens=16)
    with pytest.raises(ValueError, match="window_pages=False"):
        cache.load(torch.zeros(2, 3, 2, 16), torch.zeros(2, 3, 2, 16))
    full = PagedCache(model, max_tokens=16, window_pages=False)
    assert full.window is None and full.kv.shape[0] == model.config.num_hidden_layers
    with pytest.raises(ValueError, match="save_window: this cache has no window pages"):
        full.save_window(MemoryStore(), key, torch.arange(0))
    with pytest.raises(ValueError, match="window_slack must be an int >= 0"):
        PagedCache(model, window_slack=-1)
