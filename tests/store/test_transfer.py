"""Layer-wise loading into paged caches and saving out of them (the CPU path of the same code)."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from cattn.paged import PagedSequences, PagePool
from cattn.store.contract import EntryKey, KVEntry
from cattn.store.lease import KVLease
from cattn.store.memory import MemoryStore
from cattn.store.tiered.store import TieredStore
from cattn.store.transfer import LayerLoader, LayerSaver, preload_layers

L, H, D, PAGE = 3, 2, 8, 4
KEY = EntryKey("acme", "0123abcd", "chat")


def caches(num_pages=32, dtype=torch.float32):
    return ([torch.randn(num_pages, PAGE, H, D).to(dtype) for _ in range(L)],
            [torch.randn(num_pages, PAGE, H, D).to(dtype) for _ in range(L)])


def entry(n, first_id=0, dtype=torch.float32):
    return KVEntry(torch.arange(first_id, first_id + n), torch.randn(L, n, H, D).to(dtype),
                   torch.randn(L, n, H, D).to(dtype))


def rows(cache, slots):
    return cache.view(-1, H, D)[slots]


@pytest.mark.parametrize("store_kind", ["tiered", "memory"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_turns_load_and_save_through_paged_caches(store_kind, dtype):
    store = TieredStore(1 << 20) if store_kind == "tiered" else MemoryStore()
    turns = [entry(n, first_id=100 * i, dtype=dtype) for i, n in enumerate((9, 6, 5))]
    store.save(KEY, turns[0])                         # turn 0 came from elsewhere
    history = turns[0]
    seqs = PagedSequences(PagePool(32, PAGE))
    seqs.append_slots("other", 3)                     # pages interleave with another sequence's
    for i, new in enumerate(turns[1:], start=1):
        k_caches, v_caches = caches(dtype=dtype)
        n = history.num_tokens
        slots = torch.tensor(seqs.append_slots(f"turn{i}", n))
        seqs.append_slots("other", 5)
        source = store.acquire(KEY) if store_kind == "tiered" else store.load(KEY)
        untouched = [c.clone() for c in k_caches]
        loader = LayerLoader(source, k_caches, v_caches, slots)
        loader.preload(preload_layers(L, load_s=2.0, compute_s=1.0))
        new_slots = torch.tensor(seqs.append_slots(f"turn{i}", new.num_tokens))
        saver = LayerSaver(store, KEY, new.token_ids, n, k_caches, v_caches, new_slots)
        for layer in range(L):                        # what an attention module does per layer
            loader.wait(layer)
            assert torch.equal(rows(k_caches[layer], slots), history.k[layer])
            assert torch.equal(rows(v_caches[layer], slots), history.v[layer])
            k_caches[layer].view(-1, H, D)[new_slots] = new.k[layer]   # write_kv of the new tokens
            v_caches[layer].view(-1, H, D)[new_slots] = new.v[layer]
            saver.layer_written(layer)
        loader.close()
        saver.finish().result()
        for layer in range(L):                        # slots outside the sequence were not written
            others = torch.ones(32 * PAGE, dtype=torch.bool)
            others[torch.cat([slots, new_slots])] = False
            assert torch.equal(k_caches[layer].view(-1, H, D)[others], untouched[layer].view(-1, H, D)[others])
        history = KVEntry(torch.cat([history.token_ids, new.token_ids]), torch.cat([history.k, new.k], 1),
                          torch.cat([history.v, new.v], 1))
        got = store.load(KEY)
        assert torch.equal(got.token_ids, history.token_ids)
        assert torch.equal(got.k, history.k) and torch.equal(got.v, history.v)
    if store_kind == "tiered":
        s = store.stats()
        assert s["dram"]["bytes_in"] == sum(t.nbytes for t in turns)   # only new tokens crossed
        assert s["transfer"]["loads"] == 2 and s["transfer"]["bytes"] == (9 + 15) * 2 * L * H * D * dtype.itemsize
        assert s["transfer"]["load_s_hidden"] > 0 and s["transfer"]["load_s_exposed"] > 0
        assert s["dram"]["used_bytes"] > 0
        store.close()


def test_decode_tokens_saved_at_once():
    store = TieredStore(1 << 20)
    store.save(KEY, entry(4))
    k_caches, v_caches = caches()
    new = entry(3, first_id=50)
    slots = torch.tensor([17, 2, 30])
    for layer in range(L):
        k_caches[layer].view(-1, H, D)[slots] = new.k[layer]
        v_caches[layer].view(-1, H, D)[slots] = new.v[layer]
    saver = LayerSaver(store, KEY, new.token_ids, 4, k_caches, v_caches, slots)
    saver.save_all()
    saver.finish().result()
    got = store.load(KEY)
    assert torch.equal(got.k[:, 4:], new.k) and torch.equal(got.v[:, 4:], new.v)


def test_commit_errors_surface_in_the_future():
    store = TieredStore(1 << 20)
    k_caches, v_caches = caches()
    saver = LayerSaver(store, KEY, torch.arange(2), 5, k_caches, v_caches, torch.tensor([0, 1]))
    saver.save_all()
    with pytest.raises(ValueError, match="start=5"):
        saver.finish().result()
    assert store.stats()["dram"]["used_bytes"] == 0


def test_bad_arguments_are_named():
    k_caches, v_caches = caches()
    lease = KVLease.from_entry(entry(4))
    with pytest.raises(ValueError, match="slot_mapping"):
        LayerLoader(lease, k_caches, v_caches, torch.arange(3))
    with pytest.raises(ValueError, match="k_caches"):
        LayerLoader(lease, k_caches[:2], v_caches, torch.arange(4))
    with pytest.raises(ValueError, match="v_caches"):
        LayerLoader(lease, k_caches, [c.to(torch.float16) for c in v_caches], torch.arange(4))
    with pytest.raises(ValueError, match="contiguous"):
        LayerLoader(lease, [c.transpose(0, 1) for c in k_caches], v_caches, torch.arange(4))
    loader = LayerLoader(lease, k_caches, v_caches, torch.arange(4))
    with pytest.raises(ValueError, match="layer"):
        loader.wait(L)
    saver = LayerSaver(MemoryStore(), KEY, torch.arange(2), 0, k_caches, v_caches, torch.tensor([0, 1]))
    saver.layer_written(0)
    with pytest.raises(ValueError, match="already saved"):
        saver.layer_written(0)
    with pytest.raises(ValueError, match=r"never saved"):
        saver.finish()
    with pytest.raises(TypeError, match="int64"):
        LayerSaver(MemoryStore(), KEY, torch.arange(2, dtype=torch.int32), 0, k_caches, v_caches, torch.arange(2))


def _stalls(num_layers, k, load_s, compute_s):
    """Simulate the pipeline: copies back to back from the job's start (k layers already there),
    layers compute back to back, each waiting for its copy; returns the total stall."""
    t, stall = 0.0, 0.0
    for j in range(num_layers):
        ready = 0.0 if j < k else (j - k + 1) * load_s
        if ready > t:
            stall += ready - t
            t = ready
        t += compute_s
    return stall


@settings(max_examples=200, deadline=None)
@given(num_layers=st.integers(1, 96), load=st.integers(0, 50), compute=st.integers(0, 50))
def test_preload_rule_is_the_smallest_stall_free_buffer(num_layers, load, compute):
    k = preload_layers(num_layers, float(load), float(compute))
    assert 0 <= k <= num_layers
    assert _stalls(num_layers, k, load, compute) == 0
    if k > 0:
        assert _stalls(num_layers, k - 1, load, compute) > 0


def test_preload_rule_rejects_negative_inputs():
    with pytest.raises(ValueError, match="load_s"):
        preload_layers(4, -1.0, 1.0)
