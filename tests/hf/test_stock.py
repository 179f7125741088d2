"""A patched model behaves like the stock one wherever the stock one works: forward without a cache, with
``use_cache=False`` or a ``DynamicCache``; ``generate`` greedy, sampling, beam search, several returned
sequences, padded batches, ``return_dict_in_generate``, streamers, and a second call on the output."""
import copy

import pytest
import torch
from transformers.cache_utils import DynamicCache
from transformers.generation.streamers import BaseStreamer

from cattn.hf import CACHE_KWARG, PagedCache, apply_cattn, revert_cattn

FP32 = dict(atol=2e-5, rtol=1e-4)
FAMILIES = ["llama", "qwen3"]


@pytest.fixture(scope="module")
def pairs(tiny_model):
    """``family -> (stock, patched)``, built once for this file (generation never changes weights)."""
    torch.manual_seed(7)
    built = {}
    for family in FAMILIES:
        stock = tiny_model(family)
        built[family] = stock, apply_cattn(copy.deepcopy(stock), page_size=4)
    return built


def padded_batch():
    """Two prompts of 9 and 5 tokens, the second left-padded, as a tokenizer pads for generation."""
    ids = torch.randint(0, 256, (2, 9))
    mask = torch.ones_like(ids)
    ids[1, :4], mask[1, :4] = 257, 0
    return ids, mask


def generate(model, ids, mask, n=5, seed=None, **kwargs):
    if seed is not None:
        torch.manual_seed(seed)
    with torch.no_grad():
        return model.generate(ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n, **kwargs)


def forward_lengths(model):
    """Record the input width of every forward call of ``model``'s decoder."""
    seen = []
    handle = model.get_decoder().register_forward_pre_hook(
        lambda module, args, kwargs: seen.append(kwargs["input_ids"].shape[1]), with_kwargs=True)
    return seen, handle


@pytest.mark.parametrize("family", FAMILIES)
def test_forward_without_a_cache_equals_stock(pairs, family):
    stock, model = pairs[family]
    ids, mask = padded_batch()
    real = mask.bool()
    with torch.no_grad():
        expected = stock(ids, attention_mask=mask).logits
        for kwargs in ({}, {"use_cache": False}):
            out = model(ids, attention_mask=mask, **kwargs)
            torch.testing.assert_close(out.logits[real], expected[real], **FP32)
        assert isinstance(getattr(model(ids), CACHE_KWARG), DynamicCache)       # the model's own default, as stock
        torch.testing.assert_close(model(ids).logits, stock(ids).logits, **FP32)


@pytest.mark.parametrize("family", FAMILIES)
def test_dynamic_cache_handed_in_holds_the_stock_cache(pairs, family):
    """A DynamicCache is filled as the stock model fills it, so either model can continue from it."""
    stock, model = pairs[family]
    ids = torch.randint(0, 256, (1, 12))
    with torch.no_grad():
        expected = stock(ids).logits
        ours, theirs = DynamicCache(config=stock.config), DynamicCache(config=stock.config)
        first = model(ids[:, :8], **{CACHE_KWARG: ours}).logits
        stock(ids[:, :8], **{CACHE_KWARG: theirs})
        for layer in range(len(ours.layers)):
            torch.testing.assert_close(ours.layers[layer].keys, theirs.layers[layer].keys, **FP32)
            torch.testing.assert_close(ours.layers[layer].values, theirs.layers[layer].values, **FP32)
        rest = model(ids[:, 8:], **{CACHE_KWARG: ours}).logits
    torch.testing.assert_close(torch.cat([first, rest], dim=1), expected, **FP32)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("mode", [
    dict(do_sample=False),
    dict(do_sample=True, seed=3, top_k=20),
    dict(do_sample=True, seed=5, num_return_sequences=3),
    dict(do_sample=False, num_beams=3),
    dict(do_sample=False, num_beams=3, num_return_sequences=2),
    dict(do_sample=False, use_cache=False),
], ids=["greedy", "sampling", "sampling-3-sequences", "beam", "beam-2-sequences", "no-cache"])
def test_generate_equals_stock_on_a_padded_batch(pairs, family, mode):
    stock, model = pairs[family]
    ids, mask = padded_batch()
    seen, handle = forward_lengths(model)
    try:
        got = generate(model, ids, mask, **mode)
    finally:
        handle.remove()
    assert torch.equal(got, generate(stock, ids, mask, **mode))
    if mode.get("use_cache", True):
        assert seen == [9, 1, 1, 1, 1]                # one prefill, then one token a step: the paged cache


def test_generate_returns_its_paged_cache_and_a_second_call_continues_from_it(pairs):
    stock, model = pairs["llama"]
    ids = torch.randint(0, 256, (1, 7))
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=4, min_new_tokens=4, do_sample=False, return_dict_in_generate=True,
                             output_scores=True)
        expected = stock.generate(ids, max_new_tokens=4, min_new_tokens=4, do_sample=False,
                                  return_dict_in_generate=True, output_scores=True)
    assert torch.equal(out.sequences, expected.sequences)
    for got, want in zip(out.scores, expected.scores):
        torch.testing.assert_close(got, want, **FP32)
    cache = getattr(out, CACHE_KWARG)                   # the output field is named like the argument
    assert isinstance(cache, PagedCache) and cache.num_tokens() == 10
    free_before = cache.pool.num_pages

    follow_up = torch.cat([out.sequences, torch.randint(0, 256, (1, 9))], dim=1)
    seen, handle = forward_lengths(model)
    try:
        second = generate(model, follow_up, torch.ones_like(follow_up), n=12, do_sample=False,
                          **{CACHE_KWARG: cache})
    finally:
        handle.remove()
    assert torch.equal(second, generate(stock, follow_up, torch.ones_like(follow_up), n=12, do_sample=False))
    assert seen[0] == follow_up.shape[1] - 10                  # only what the cache lacked was prefilled
    assert cache.pool.num_pages > free_before                  # the generate-made cache grew to fit


def test_streamer_sees_the_stock_tokens(pairs):
    class Collect(BaseStreamer):
        def __init__(self):
            self.chunks = []

        def put(self, value):
            self.chunks.append(value.clone())

        def end(self):
            self.chunks.append(None)

    stock, model = pairs["qwen3"]
    ids = torch.randint(0, 256, (1, 6))
    streams = []
    for m in (stock, model):
        streamer = Collect()
        generate(m, ids, torch.ones_like(ids), n=4, do_sample=False, streamer=streamer)
        streams.append(streamer.chunks)
    assert len(streams[1]) == 6 and streams[1][-1] is None
    assert all(torch.equal(a, b) for a, b in zip(streams[0][:-1], streams[1][:-1]))


def test_beam_reorder_copies_rows(pairs):
    _, model = pairs["llama"]
    cache = PagedCache(model, batch_size=3, max_tokens=8)
    with torch.no_grad():
        model(torch.randint(0, 256, (3, 6)), **{CACHE_KWARG: cache})
    before = [cache.read(0, 6, row) for row in range(3)]
    cache.reorder_cache(torch.tensor([2, 2, 0]))
    for row, source in enumerate([2, 2, 0]):
        assert all(torch.equal(a, b) for a, b in zip(cache.read(0, 6, row), before[source]))
    cache.batch_select_indices(torch.tensor([2]))
    assert cache.batch_size == 1 and torch.equal(cache.read(0, 6)[0], before[0][0])
    assert cache.pool.num_free == cache.pool.num_pages - 2


def test_smollm2_generate_and_forward_equal_stock(smollm2):
    model, tokenizer = smollm2
    prompt = tokenizer("The three primary colours are", return_tensors="pt")
    ids, mask = prompt["input_ids"], prompt["attention_mask"]
    with torch.no_grad():
        expected_logits = model(ids).logits
        expected = generate(model, ids, mask, n=4, do_sample=False)
        beams = generate(model, ids, mask, n=2, do_sample=False, num_beams=2)
    apply_cattn(model)
    try:
        with torch.no_grad():
            torch.testing.assert_close(model(ids, use_cache=False).logits, expected_logits, atol=1e-4, rtol=1e-4)
        assert torch.equal(generate(model, ids, mask, n=4, do_sample=False), expected)
        assert torch.equal(generate(model, ids, mask, n=2, do_sample=False, num_beams=2), beams)
    finally:
        revert_cattn(model)
