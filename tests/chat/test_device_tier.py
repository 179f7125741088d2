"""The device tier: resident first layers between turns, shrink before demotion, metadata-only edits,
and chats that equal the stock model while a small budget forces partial residency and demotions."""
import random

import pytest
import torch

from cattn.hf import PagedCache, apply_cattn
from cattn.chat.session import ChatSession
from cattn.store import DiskTier, TieredStore
from cattn.store.contract import EntryKey, KVEntry
from cattn.store.device.tier import DeviceTier, DeviceTierConfig, Resident
from cattn.store.policy.base import FIFO, Scheduler
from tests.chat.stock import GREEDY, SYSTEM, matches_stock, matches_stock_over_kept_kv, prompt_ids

PS, H, D = 16, 2, 16   # the default page size: the stock comparisons patch the model again with it


def key(s):
    return EntryKey("acme", "0123abcd", s)


def resident(n, layers, capacity=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    pages = -(-n // PS)
    capacity = capacity or pages
    return Resident(torch.randint(0, 1000, (n,), generator=g), list(range(pages)),
                    [torch.randn(capacity, PS, H, D, generator=g) for _ in range(layers)],
                    [torch.randn(capacity, PS, H, D, generator=g) for _ in range(layers)])


def test_take_put_hits_and_wrong_tokens_are_a_miss():
    tier = DeviceTier(1 << 20)
    res = resident(40, 3)
    ids, k0 = res.token_ids.clone(), res.k[0].clone()
    tier.put(key("a"), res, keep_layers=2)
    assert tier.resident_layers(key("a")) == 2
    got = tier.take(key("a"), ids[:20], num_layers=3)
    assert got.num_tokens == 20 and got.pages == [0, 1] and torch.equal(got.k[0], k0)   # the same pages, no copy
    assert tier.stats()["hits_partial"] == 1 and tier.stats()["entries"] == 0             # taken out while in use
    tier.put(key("a"), got, keep_layers=3)
    wrong = ids[:20].clone()
    wrong[3] += 1
    assert tier.take(key("a"), wrong, num_layers=2) is None     # another history: dropped, never served
    assert tier.take(key("a"), ids[:20], num_layers=2) is None
    assert tier.stats()["misses"] == 2


def test_pressure_shrinks_layers_before_demoting_whole_sessions():
    one_layer = 2 * 1 * PS * H * D * 4
    tier = DeviceTier(5 * one_layer)
    tier.put(key("a"), resident(12, 3), 3)
    tier.put(key("b"), resident(12, 3), 3)             # 6 layers > 5: the older session loses a layer
    assert (tier.resident_layers(key("a")), tier.resident_layers(key("b"))) == (2, 3)
    tier.put(key("c"), resident(12, 3), 3)             # 8 > 5: a shrinks to 1, then leaves; then b shrinks
    s = tier.stats()
    assert tier.resident_layers(key("a")) == 0 and s["demotions"] == 1
    assert s["used_bytes"] <= s["capacity_bytes"] and s["layers"] == 5
    assert s["layers_shrunk"] == 3


def test_scheduler_policy_demotes_sessions_with_no_queued_job_first():
    one_layer = 2 * 1 * PS * H * D * 4
    tier = DeviceTier(2 * one_layer, policy=Scheduler())
    tier.put(key("a"), resident(12, 1), 1)
    tier.put(key("b"), resident(12, 1), 1)
    tier.update_queue([key("a")])                       # a has a job queued, b has none
    tier.put(key("c"), resident(12, 1), 1)
    assert tier.resident_layers(key("a")) == 1 and tier.resident_layers(key("b")) == 0


def test_truncation_and_edits_are_metadata_only():
    tier = DeviceTier(1 << 20, policy=FIFO())
    res = resident(70, 2)
    ids, k = res.token_ids.clone(), res.k[1]
    tier.put(key("a"), res, 2)
    tier.truncate(key("a"), 32, keep_first=16)          # whole pages: page ids only
    kept = torch.cat([ids[:16], ids[48:]])
    got = tier.take(key("a"), kept, 2)
    assert got.pages == [0, 3, 4] and got.k[1] is k
    tier.put(key("a"), got, 2)
    tier.trim(key("a"), 5)                              # the store's history changed after token 5
    assert tier.take(key("a"), kept, 2) is None
    tier.put(key("b"), resident(9, 1), 1)
    tier.truncate(key("b"), 3, keep_first=2)            # not on page boundaries: the pages go, a miss later
    assert tier.resident_layers(key("b")) == 0
    tier.put(key("c"), resident(9, 1), 1)
    taken = tier.take(key("c"), resident(9, 1).token_ids, 1)
    tier.delete(key("c"))                               # deleted while its turn ran: not kept at put
    tier.put(key("c"), taken, 1)
    assert tier.resident_layers(key("c")) == 0


@pytest.mark.parametrize("bad, error", [(dict(), ValueError), (dict(budget_bytes=1, budget_fraction=0.5), ValueError),
                                        (dict(budget_bytes=-1), ValueError), (dict(budget_bytes=1, layers=-1), ValueError),
                                        (dict(budget_bytes=1, headroom=-0.1), ValueError)])
def test_bad_config_is_refused(bad, error):
    with pytest.raises(error):
        DeviceTierConfig(**bad)


def test_bad_arguments_are_refused():
    with pytest.raises(TypeError, match="config"):
        DeviceTier("1GB")
    with pytest.raises(ValueError, match="CUDA"):
        DeviceTier(DeviceTierConfig(budget_fraction=0.5), "cpu")
    with pytest.raises(TypeError, match="policy"):
        DeviceTier(1 << 20, policy="lru")
    tier = DeviceTier(1 << 20)
    with pytest.raises(TypeError, match="EntryKey"):
        tier.take(("acme", "0123abcd", "a"), torch.arange(3), 2)
    with pytest.raises(TypeError, match="device"):
        TieredStore(1 << 20, device=1 << 20)


@pytest.fixture
def deep_model(tiny_model, byte_tokenizer):
    return apply_cattn(tiny_model("qwen3", num_hidden_layers=4), page_size=PS), byte_tokenizer


def test_resident_layers_are_attended_in_place(deep_model):
    model, _ = deep_model
    cache = PagedCache(model, max_tokens=20, keep_layers=2)
    k, v = torch.randn(4, 9, H, D), torch.randn(4, 9, H, D)
    cache.load(k, v)
    res = cache.take_resident(torch.arange(9), 2)
    assert res.num_layers == 2
    assert res.capacity_pages == 3                      # 2 pages and half again of headroom
    again = PagedCache(model, max_tokens=28, resident=res)
    assert again.num_tokens() == 9 and again.layer(0)[0] is res.k[0] and again.layer(1)[1] is res.v[1]
    assert again.grown_bytes == 0
    with pytest.raises(ValueError, match="resident layers hold 9"):
        again.load_layerwise(KVEntry(torch.arange(5), k[:, :5], v[:, :5]))
    again.load_layerwise(KVEntry(torch.arange(9), k, v))
    again.finish()
    got_k, got_v = again.read(0, 9)
    assert torch.equal(got_k, k) and torch.equal(got_v, v)
    bigger = PagedCache(model, max_tokens=64, resident=again.take_resident(torch.arange(9), 4))
    assert bigger.grown_bytes == 2 * 2 * res.k[0].nbytes           # outgrown: one device-to-device copy
    bigger.load_layerwise(KVEntry(torch.arange(9), k, v))
    got_k, got_v = bigger.read(0, 9)
    assert torch.equal(got_k, k) and torch.equal(got_v, v)


def test_chats_equal_stock_under_a_small_budget(deep_model, tmp_path):
    """Many sessions, turns interleaved, a budget of a few layers: partial residency, shrinking, demotion,
    truncation; every reply equals stock greedy decoding and the tier never exceeds its budget."""
    model, tok = deep_model
    layer_bytes = 2 * 12 * PS * H * D * 4          # about one session's layer with headroom
    device = DeviceTier(DeviceTierConfig(budget_bytes=5 * layer_bytes, layers=3))
    store = TieredStore(1 << 20, DiskTier(tmp_path, 4 << 20), device=device)
    sessions = [ChatSession(model, tok, session_id=f"s{i}", store=store, system=SYSTEM,
                            max_context=130 if i == 0 else 512) for i in range(3)]
    rng = random.Random(0)
    texts = ["Hello there", "Tell me more", "And then?", "Why so?", "Go on", "Last one"]
    for turn in range(4):
        for s in rng.sample(sessions, len(sessions)):
            s.send(texts[(turn + int(s.key.session[1:])) % len(texts)], **GREEDY)
            # After a truncation the kept KV is reused as is: the stock model given that KV is the reference.
            truncated = any(t.dropped_tokens for t in s.turns)
            assert (matches_stock_over_kept_kv if truncated else matches_stock)(model, s), (s.key.session, turn)
            stats = store.stats()["device"]
            assert stats["used_bytes"] <= stats["capacity_bytes"]
    stats = store.stats()["device"]
    assert stats["hits_partial"] > 0 and stats["bytes_not_copied"] > 0
    assert stats["layers_shrunk"] > 0 and stats["demotions"] > 0
    assert sum(t.dropped_tokens for t in sessions[0].turns) > 0      # the short session truncated
    assert any(t.reused_tokens for t in sessions[0].turns[1:])
    for s in sessions:
        assert store.lookup(s.key).tolist() == s.token_ids.tolist()[:-1]   # DRAM holds every token too
    store.close()
    assert store.stats()["device"]["entries"] == 0
    again = TieredStore(1 << 20, DiskTier(tmp_path, 4 << 20), device=DeviceTier(5 * layer_bytes))
    for s in sessions:                                                     # a restart: nothing lost
        assert again.lookup(s.key).tolist() == s.token_ids.tolist()[:-1]
    assert again.stats()["device"]["entries"] == 0
    again.close()


def test_fully_resident_session_copies_nothing(deep_model):
    model, tok = deep_model
    device = DeviceTier(DeviceTierConfig(budget_bytes=1 << 24, layers=4))
    store = TieredStore(1 << 20, device=device)
    s = ChatSession(model, tok, session_id="full", store=store, system=SYSTEM)
    for text in ["Hello there", "Tell me more", "And then?"]:
        s.send(text, **GREEDY)
        assert matches_stock(model, s)
    st = store.stats()
    assert st["device"]["hits_full"] == 2 and st["transfer"]["loads"] == 0
    assert st["device"]["bytes_not_copied"] == sum(t.reused_tokens for t in s.turns) * 2 * 4 * H * D * 4
    assert prompt_ids(s)[:s.turns[-1].reused_tokens] == store.lookup(s.key).tolist()[:s.turns[-1].reused_tokens]
    store.close()


def test_look_ahead_brings_demoted_sessions_back_from_dram():
    """Scheduler-aware: a demoted session whose job is queued comes back up (its share of layers, exactly
    its stored K/V), by demoting only a session with no queued job; LRU (no look-ahead) brings nothing."""
    from cattn.store.contract import KVEntry as Entry
    for policy, expect in ((Scheduler(), True), (FIFO(), False)):
        one_layer = 2 * 1 * PS * H * D * 4
        device = DeviceTier(DeviceTierConfig(budget_bytes=2 * one_layer, headroom=0.0), policy=policy)
        store = TieredStore(1 << 20, device=device)
        kv = {}
        for name in ("a", "b", "c"):
            g = torch.Generator().manual_seed(ord(name))
            kv[name] = Entry(torch.randint(0, 1000, (12,), generator=g), torch.randn(2, 12, H, D, generator=g),
                             torch.randn(2, 12, H, D, generator=g))
            store.save(key(name), kv[name])
            r = resident(12, 2)
            for layer in range(2):
                r.k[layer].view(-1, H, D)[:12] = kv[name].k[layer]
                r.v[layer].view(-1, H, D)[:12] = kv[name].v[layer]
            device.put(key(name), r, 2)
        assert device.resident_layers(key("a")) == 0 and device.stats()["demotions"] >= 1
        store.update_queue([key("a")])
        assert (device.resident_layers(key("a")) > 0) == expect
        if expect:
            got = device.take(key("a"), kv["a"].token_ids, 2)
            slots = torch.tensor(got.pages)[torch.arange(12) // PS] * PS + torch.arange(12) % PS
            assert torch.equal(got.k[0].view(-1, H, D)[slots], kv["a"].k[0])
            assert torch.equal(got.v[got.num_layers - 1].view(-1, H, D)[slots], kv["a"].v[got.num_layers - 1])
            assert device.stats()["prefetched"] == 1
        store.close()
