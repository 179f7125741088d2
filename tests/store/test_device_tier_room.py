"""The device tier never causes out-of-memory: `make_room` against an injected free-memory probe, on CPU.

The fake device has ``total`` bytes and counts as used exactly the resident tensors still alive (weak
references), so a demotion frees memory only when the tier really let go of a session's pages.
"""
import random
import weakref

import pytest
import torch

from cattn.store import TieredStore
from cattn.store.contract import EntryKey, KVEntry
from cattn.store.device.tier import DeviceTier, DeviceTierConfig, Resident
from cattn.store.policy.base import FIFO, LRU

PS, H, D, LAYERS = 4, 2, 8, 2


def key(s):
    return EntryKey("acme", "0123abcd", s)


class FakeDevice:
    """``total`` bytes, minus every tensor handed to the tier that is still alive."""

    def __init__(self, total):
        self.total, self.tensors, self.calls = total, [], 0

    def track(self, res: Resident) -> Resident:
        self.tensors += [weakref.ref(t) for t in (*res.k, *res.v)]
        return res

    def used(self):
        return sum(t().nbytes for t in self.tensors if t() is not None)

    def free_bytes(self):
        self.calls += 1
        return self.total - self.used()


def stored_session(store, device, fake, name, n, g):
    """Save ``n`` tokens of random KV for ``name`` to ``store`` and keep all its layers resident (the same
    K/V in pages ``0..``); returns what was saved."""
    kv = KVEntry(torch.randint(0, 50_000, (n,), generator=g), torch.randn(LAYERS, n, H, D, generator=g),
                 torch.randn(LAYERS, n, H, D, generator=g))
    store.save(key(name), kv)
    pages = -(-n // PS)
    ks = [torch.zeros(pages, PS, H, D) for _ in range(LAYERS)]
    vs = [torch.zeros(pages, PS, H, D) for _ in range(LAYERS)]
    for layer in range(LAYERS):
        ks[layer].view(-1, H, D)[:n] = kv.k[layer]
        vs[layer].view(-1, H, D)[:n] = kv.v[layer]
    device.put(key(name), fake.track(Resident(kv.token_ids.clone(), list(range(pages)), ks, vs)), LAYERS)
    return kv


@pytest.mark.parametrize("policy", [LRU, FIFO])
def test_make_room_demotes_victims_until_enough_is_free_and_no_more(policy):
    g = torch.Generator().manual_seed(random.randrange(2**31))
    sizes = [random.randint(1, 6) * PS for _ in range(5)]
    session_bytes = [2 * LAYERS * n * H * D * 4 for n in sizes]
    reserve = random.randrange(0, 4096, 4)
    fake = FakeDevice(sum(session_bytes) + random.randrange(0, 4096, 4))
    device = DeviceTier(DeviceTierConfig(budget_bytes=1 << 30, reserve_bytes=reserve), "cpu",
                        policy=policy(), free_bytes=fake.free_bytes)
    store = TieredStore(1 << 22, device=device)
    names = [f"s{i}" for i in range(len(sizes))]
    kv = {name: stored_session(store, device, fake, name, n, g) for name, n in zip(names, sizes)}
    assert device.stats()["entries"] == len(names) and fake.used() == sum(session_bytes)

    # LRU and FIFO both pick the session put first: the victims leave in the order they came
    need = random.randint(1, sum(session_bytes) - 1)
    free0 = fake.free_bytes()
    enough = next((i for i in range(len(names) + 1) if free0 + sum(session_bytes[:i]) >= need + reserve),
                  len(names))   # need and reserve may be more than the whole device: then every session goes
    assert device.make_room(need) == enough
    assert [device.resident_layers(key(n)) for n in names] == [0] * enough + [LAYERS] * (len(names) - enough)
    assert fake.free_bytes() >= need + reserve or enough == len(names)
    if enough:   # one session fewer would not have been enough: nothing left that the room did not need
        assert free0 + sum(session_bytes[:enough - 1]) < need + reserve
    s = device.stats()
    assert s["released_for_room"] == s["demotions"] == enough

    assert device.make_room(0) == 0   # already enough: nothing leaves
    assert device.stats()["released_for_room"] == enough

    # more than the whole device: every session leaves, then it stops (nothing resident is left to release)
    calls = fake.calls
    assert device.make_room(fake.total + 1) == len(names) - enough
    assert device.stats()["entries"] == 0 and fake.used() == 0
    assert device.stats()["released_for_room"] == len(names)
    assert fake.calls - calls == len(names) - enough   # asked once per demotion, never once nothing is left
    assert device.make_room(fake.total + 1) == 0

    # a demoted session is a device miss, and its KV still reads back exactly from DRAM
    for name in names:
        assert device.take(key(name), kv[name].token_ids, LAYERS) is None
        got = store.load(key(name))
        assert torch.equal(got.token_ids, kv[name].token_ids)
        assert torch.equal(got.k, kv[name].k) and torch.equal(got.v, kv[name].v)
    assert store.stats()["dram"]["hits"] == len(names)
    store.close()


def test_without_a_probe_off_cuda_nothing_is_released():
    device = DeviceTier(1 << 20, "cpu")
    assert device.free_bytes is None
    device.put(key("a"), Resident(torch.arange(PS), [0], [torch.zeros(1, PS, H, D)], [torch.zeros(1, PS, H, D)]), 1)
    assert device.make_room(1 << 40) == 0
    assert device.resident_layers(key("a")) == 1 and device.stats()["released_for_room"] == 0


def test_bad_probe_and_sizes_are_refused_naming_the_argument():
    for bad in (1 << 20, "cuda", [lambda: 0]):
        with pytest.raises(TypeError, match="free_bytes must be a callable"):
            DeviceTier(1 << 20, "cpu", free_bytes=bad)
    device = DeviceTier(1 << 20, "cpu", free_bytes=lambda: 0)
    for bad in (-1, 1.5, "1GB", True):
        with pytest.raises(ValueError, match="nbytes must be an int >= 0"):
            device.make_room(bad)
