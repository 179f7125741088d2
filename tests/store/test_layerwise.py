"""Layer-wise reads from disk (`TieredStore.acquire(..., layerwise=True)`): a history on disk only arrives
one layer at a time behind its lease, each layer checksummed alone; a corrupt layer drops the session and
fails the waiting reader, never serves it; the pool is exactly accounted whatever the lease does."""
import random
import threading

import pytest
import torch

from cattn.store.errors import FormatError, HistoryLost
from cattn.store.lower import fileformat as ff
from cattn.store.lower.disk import DiskTier
from cattn.store.layout import KVLayout
from cattn.store.tiered.store import TieredStore
from tests.store.entries import L, cat, key, make_entry, saved_in_turns
from tests.store.gated_tiers import GatedLayers, corrupt_layer, wait_until


def reopened(tmp_path, sizes, disk_cls=GatedLayers):
    """A store over the disk where a session of ``sizes`` saves (one chunk each) is on disk only."""
    parts = saved_in_turns(tmp_path, sizes)
    disk = disk_cls(tmp_path, 1 << 24)
    return TieredStore(1 << 20, disk), disk, cat(*parts)


def layer(lease, part, l):
    return torch.cat([getattr(s, part)[l] for s in lease.segments])


def test_layers_arrive_one_at_a_time_and_equal_the_stored_bytes(tmp_path):
    sizes = [random.randint(3, 20) for _ in range(random.randint(2, 4))]
    store, disk, want = reopened(tmp_path, sizes)
    n = random.randint(sizes[0] + 1, sum(sizes))               # a prefix that ends inside a later chunk
    lease = store.acquire(key(), n, layerwise=True)
    chunks = sum(1 for i in range(len(sizes)) if sum(sizes[:i]) < n)
    assert lease.streamed and torch.equal(lease.token_ids, want.token_ids[:n])
    for l in range(L):
        done = threading.Event()
        waiter = threading.Thread(target=lambda: (lease.wait_layer(l), done.set()))
        waiter.start()
        assert not done.wait(0.05), f"layer {l} was served before the disk read it"
        for _ in range(chunks):
            disk.permits.release()
        waiter.join(20)
        assert done.is_set()
        assert torch.equal(layer(lease, "k", l), want.k[l, :n]) and torch.equal(layer(lease, "v", l), want.v[l, :n])
    lease.release()
    assert disk.whole_reads == 0 and disk.layer_reads == chunks * L
    stats = store.stats()
    assert stats["disk"]["layerwise_reads"] == 1 and stats["disk"]["hits"] == 1
    wait_until(lambda: store.tokens_in_dram(key()) >= n, "the read's chunks joining DRAM")
    again = store.load(key(), n)                                # now a DRAM hit, byte for byte
    assert torch.equal(again.k, want.k[:, :n]) and torch.equal(again.v, want.v[:, :n])
    assert store.stats()["dram"]["hits"] == 1 and disk.whole_reads == 0
    store.close()


def test_dram_chunks_and_disk_chunks_in_one_lease(tmp_path):
    store, disk, want = reopened(tmp_path, [7, 5])
    more = make_entry(6, first_id=777)
    store.save(key(), more, start=12)                           # the new turn is in DRAM, the old ones on disk
    assert store.tokens_in_dram(key()) == 0
    lease = store.acquire(key(), layerwise=True)
    for _ in range(2 * L):
        disk.permits.release()
    for l in range(L):
        lease.wait_layer(l)
    full = cat(want, more)
    assert torch.equal(layer(lease, "k", L - 1), full.k[L - 1]) and torch.equal(lease.token_ids, full.token_ids)
    lease.release()
    wait_until(lambda: store.tokens_in_dram(key()) == 18, "the read's chunks joining DRAM")
    store.delete(key())
    assert store.stats()["dram"]["used_bytes"] == 0
    store.close()


def test_a_corrupt_layer_fails_the_reader_and_drops_the_session(tmp_path):
    sizes = [9, 6]
    parts = saved_in_turns(tmp_path, sizes)
    bad = random.randrange(1, L)
    corrupt_layer(tmp_path, 1, bad)
    store = TieredStore(1 << 20, DiskTier(tmp_path, 1 << 24))
    lease = store.acquire(key(), layerwise=True)                # the headers check out: the lease is lent
    for l in range(bad):
        lease.wait_layer(l)                                     # the layers before the bad one are served
        assert torch.equal(layer(lease, "k", l), cat(*parts).k[l])
    with pytest.raises(HistoryLost):
        lease.wait_layer(bad)
    with pytest.raises(HistoryLost):
        lease.wait_layer(L - 1)
    lease.release()
    assert store.lookup(key()) is None and store.stats()["disk"]["corrupt"] == 1
    assert store.stats()["dram"]["used_bytes"] == 0 and store.stats()["disk"]["used_bytes"] == 0
    assert not list(tmp_path.rglob("*.kv"))
    store.close()


def test_a_lease_released_before_its_read_ends_leaks_nothing(tmp_path):
    store, disk, want = reopened(tmp_path, [8, 8])
    lease = store.acquire(key(), layerwise=True)
    disk.permits.release()
    lease.release()                                             # a forward that stopped early
    for _ in range(2 * L):
        disk.permits.release()
    wait_until(lambda: store.tokens_in_dram(key()) == 16, "the read to end")
    assert torch.equal(store.load(key()).k, want.k)
    store.delete(key())
    assert store.stats()["dram"]["used_bytes"] == 0
    store.close()


def test_files_without_layer_checksums_and_shared_chunks_are_read_whole(tmp_path, monkeypatch):
    store, disk, want = reopened(tmp_path, [5, 4])
    monkeypatch.setattr(ff, "open_chunk_layers", lambda *a: None)   # as an earlier writer's files
    lease = store.acquire(key(), layerwise=True)
    assert not lease.streamed and disk.whole_reads == 2 and disk.layer_reads == 0
    assert torch.equal(layer(lease, "v", 1), want.v[1])
    lease.release()
    store.close()


def test_layer_checksums_vouch_for_each_layer_alone(tmp_path):
    e = make_entry(13)
    store = TieredStore(1 << 20, DiskTier(tmp_path, 1 << 24))
    store.save(key(), e)
    store.close()
    (path,) = tmp_path.rglob("*.kv")
    lay = KVLayout.of(e)
    r = ff.open_chunk_layers(path, key(), lay, path.stem, 13)
    buf = torch.zeros(lay.extent_nbytes(13), dtype=torch.uint8)
    order = random.sample(range(L), L)
    for l in order:
        r.read_layer(l, buf)
    r.close()
    k, v = lay.views(buf, 13)
    assert torch.equal(k, e.k) and torch.equal(v, e.v) and torch.equal(r.token_ids, e.token_ids)
    with pytest.raises(FormatError):
        ff.open_chunk_layers(path, key(), lay, path.stem, 12)     # another chunk's header


def test_layerwise_must_be_a_bool(tmp_path):
    store = TieredStore(1 << 20, DiskTier(tmp_path, 1 << 24))
    with pytest.raises(TypeError, match="layerwise"):
        store.acquire(key(), layerwise="yes")
    store.close()


def test_close_waits_for_a_read_in_flight(tmp_path):
    store, disk, want = reopened(tmp_path, [6, 6])
    lease = store.acquire(key(), layerwise=True)
    lease.release()
    letting = threading.Timer(0.1, lambda: [disk.permits.release() for _ in range(2 * L)])
    letting.start()
    store.sync()                                                # returns once the read has ended
    assert not store.state.layer_reads and store.tokens_in_dram(key()) == 12
    store.close()
    letting.join()


def test_any_read_error_is_a_miss_never_a_hang(tmp_path, monkeypatch):
    store, disk, _ = reopened(tmp_path, [5])
    for _ in range(L):
        disk.permits.release()

    def broken(self, layer, into):
        raise RuntimeError("the device went away")
    monkeypatch.setattr(ff.ChunkLayers, "read_layer", broken)
    lease = store.acquire(key(), layerwise=True)
    with pytest.raises(HistoryLost, match="went away"):
        lease.wait_layer(0)
    lease.release()
    store.sync()
    assert store.lookup(key()) is None and store.stats()["dram"]["used_bytes"] == 0
    store.close()
