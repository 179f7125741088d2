"""Every family of the adapter table gives the stock model's logits, prefill, extend and decode, on both
backends (Triton in the interpreter on CPU), from tiny random models built with transformers' own configs."""
import copy

import pytest
import torch

from cattn.hf import CACHE_KWARG, SUPPORTED_MODEL_TYPES, PagedCache, apply_cattn
from tests.hf.tiny_models import TINY_FAMILIES

FP32 = dict(atol=3e-5, rtol=1e-4)   # fp32 end to end; the paths differ only in summation order
PAGE = 4
CHUNKS = [(0, 13), (13, 21), (21, 22), (22, 23)]     # prefill, extend over history, two decodes
FAMILIES = ["mixtral", "qwen2_moe", "qwen3_moe", "phi3", "olmo2", "granite", "gpt_neox", "cohere", "gemma2", "gemma3"]


def chunked_logits(stock, model, ids):
    """The patched model's logits over ``CHUNKS`` with one PagedCache, and the stock model's logits of the
    same positions, each chunk computed by stock on the whole prefix (so longrope switches as in stock)."""
    cache = PagedCache(model, max_tokens=32)
    got, expected = [], []
    with torch.no_grad():
        for a, b in CHUNKS:
            got.append(model(ids[:, a:b], **{CACHE_KWARG: cache}).logits)
            expected.append(stock(ids[:, :b]).logits[:, a:b])
    return torch.cat(got, dim=1), torch.cat(expected, dim=1)


@pytest.mark.parametrize("family", FAMILIES)
def test_torch_backend_logits_equal_stock(tiny_model, family):
    stock = tiny_model(family)
    model = apply_cattn(copy.deepcopy(stock), page_size=PAGE, backend="torch")
    got, expected = chunked_logits(stock, model, torch.randint(0, 256, (1, 23)))
    torch.testing.assert_close(got, expected, **FP32)


@pytest.mark.parametrize("family", FAMILIES)
def test_triton_backend_logits_equal_stock(tiny_model, family):
    stock = tiny_model(family, num_hidden_layers=2)
    model = apply_cattn(copy.deepcopy(stock), page_size=PAGE, backend="triton")
    got, expected = chunked_logits(stock, model, torch.randint(0, 256, (1, 23)))
    torch.testing.assert_close(got, expected, **FP32)


def test_every_supported_type_has_a_tiny_model_here():
    assert set(SUPPORTED_MODEL_TYPES) - {"gemma3_text"} <= set(TINY_FAMILIES)


def test_sliding_layers_alternate_and_the_window_and_softcap_reach_the_modules(tiny_model):
    model = apply_cattn(tiny_model("gemma2"), page_size=PAGE)
    layers = model.get_decoder().layers
    assert [layer.self_attn.sliding_window for layer in layers] == [6, None]
    assert [layer.self_attn.logit_softcap for layer in layers] == [2.0, 2.0]
    gemma3 = apply_cattn(tiny_model("gemma3"), page_size=PAGE)
    bases = [layer.self_attn.rope.inv_freq[1].item() for layer in gemma3.get_decoder().layers]
    assert bases[0] != bases[1]                              # local and global rope bases differ


@pytest.mark.parametrize("family", FAMILIES)
def test_generate_on_a_padded_batch_equals_stock_and_fingerprints_differ(tiny_model, family):
    """Greedy generation past Gemma's window of 6, with a left-padded row, through the generate-made cache."""
    from cattn.hf import fingerprint

    stock = tiny_model(family)
    model = apply_cattn(copy.deepcopy(stock), page_size=PAGE)
    ids = torch.randint(0, 256, (2, 8))
    mask = torch.ones_like(ids)
    ids[1, :3], mask[1, :3] = 257, 0
    with torch.no_grad():
        kwargs = dict(attention_mask=mask, max_new_tokens=4, min_new_tokens=4, do_sample=False)
        out = model.generate(ids, return_dict_in_generate=True, **kwargs)
        assert torch.equal(out.sequences, stock.generate(ids, **kwargs))
    assert isinstance(getattr(out, CACHE_KWARG), PagedCache)
    assert fingerprint(model) == fingerprint(stock) != fingerprint(tiny_model(family))
