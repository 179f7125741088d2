"""TieredStore: capacity and watermarks, isolation, corrupt files, out-of-space, truncation, concurrency."""
import errno
import os
import struct
import threading
import time

import pytest
import torch
import xxhash

from cattn.store.contract import KVEntry
from cattn.store.lower.disk import DiskTier
from cattn.store.layout import KVLayout
from cattn.store.policy.base import LRU
from cattn.store.errors import StoreFullError
from cattn.store.tiered.store import TieredStore
from tests.store.entries import D, H, L, TOKEN_BYTES, assert_same, key, make_entry


def test_save_load_append_and_isolation(tmp_path):
    store = TieredStore(1 << 20, DiskTier(tmp_path, 1 << 22))
    a, b = make_entry(40), make_entry(25, first_id=40)
    store.save(key(), a)
    store.save(key(), b, start=40)
    both = KVEntry(torch.cat([a.token_ids, b.token_ids]), torch.cat([a.k, b.k], 1), torch.cat([a.v, b.v], 1))
    assert_same(store.load(key()), both)
    assert store.stats()["dram"]["bytes_in"] == 65 * TOKEN_BYTES   # history is never copied again
    prefix = store.load(key(), 30)
    assert torch.equal(prefix.k, a.k[:, :30]) and torch.equal(prefix.token_ids, a.token_ids[:30])
    with pytest.raises(ValueError, match="start=70"):
        store.save(key(), make_entry(3), start=70)
    for other in (key(tenant="other"), key(model="0123abce"), key(session="s1")):
        assert store.lookup(other) is None and store.load(other) is None
    store.close()
    store = TieredStore(1 << 20, DiskTier(tmp_path, 1 << 22))   # a new process finds it, under its key only
    assert torch.equal(store.lookup(key()), both.token_ids)
    assert_same(store.load(key()), both)
    for other in (key(tenant="other"), key(model="0123abce")):
        assert store.load(other) is None
    store.close()


def test_one_process_per_directory(tmp_path):
    store = TieredStore(1 << 16, DiskTier(tmp_path, 1 << 20))
    with pytest.raises(RuntimeError, match="in use"):
        DiskTier(tmp_path, 1 << 20)
    store.close()
    DiskTier(tmp_path, 1 << 20).close()


def _rewrite_frame(path, version=None, meta_edit=None):
    """Re-encode a file's header frame with another version or edited json, with a valid checksum."""
    import json
    data = bytearray(path.read_bytes())
    magic, ver, jlen, blen = struct.unpack_from("<8sIIQ", data)
    meta = json.loads(data[24:24 + jlen])
    if meta_edit:
        meta_edit(meta)
    body = json.dumps(meta, separators=(",", ":"), sort_keys=True).encode()
    assert len(body) == jlen, "edit must keep the json length"
    head = struct.pack("<8sIIQ", magic, version or ver, jlen, blen) + body + bytes(data[24 + jlen:24 + jlen + blen])
    data[:len(head) + 8] = head + struct.pack("<Q", xxhash.xxh3_64_intdigest(head))
    path.write_bytes(bytes(data))


def _flip(path, offset):
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x10
    path.write_bytes(bytes(data))


def _tamper(kind, d):
    chunk, = d.glob("*.kv")
    manifest, = d.glob("*.manifest")
    if kind == "flip_payload":
        _flip(chunk, chunk.stat().st_size - 100)
    elif kind == "flip_chunk_header":
        _flip(chunk, 40)
    elif kind == "flip_manifest":
        _flip(manifest, manifest.stat().st_size // 2)
    elif kind == "truncated_chunk":
        os.truncate(chunk, chunk.stat().st_size - 1)
    elif kind == "truncated_manifest":
        os.truncate(manifest, manifest.stat().st_size - 5)
    elif kind == "other_version":
        _rewrite_frame(chunk, version=2)
        _rewrite_frame(manifest, version=2)
    elif kind == "other_version_chunk_only":
        _rewrite_frame(chunk, version=2)
    elif kind == "other_fingerprint":   # a file of another model placed under this model's name
        _rewrite_frame(manifest, meta_edit=lambda m: m.update(model="0123abce"))
    elif kind == "other_tenant_chunk":
        _rewrite_frame(chunk, meta_edit=lambda m: m.update(tenant="acmf"))


@pytest.mark.parametrize("kind", ["flip_payload", "flip_chunk_header", "flip_manifest", "truncated_chunk",
                                  "truncated_manifest", "other_version", "other_version_chunk_only",
                                  "other_fingerprint", "other_tenant_chunk"])
def test_bad_file_is_a_counted_miss(tmp_path, kind):
    store = TieredStore(1 << 20, DiskTier(tmp_path, 1 << 22))
    good = make_entry(30)
    store.save(key(), good)
    store.save(key("s1"), good)
    store.close()
    _tamper(kind, tmp_path / "acme" / "0123abcd" / "s0")
    store = TieredStore(1 << 20, DiskTier(tmp_path, 1 << 22))
    assert store.load(key()) is None
    assert store.lookup(key()) is None
    s = store.stats()["disk"]
    assert s["corrupt"] == 1 and s["misses"] >= 1
    assert_same(store.load(key("s1")), good)           # the other session is untouched
    store.save(key(), good)                            # and the key is usable again
    assert_same(store.load(key()), good)
    store.close()


def test_high_watermark_demotes_to_low_watermark(tmp_path):
    per_entry = 16 * TOKEN_BYTES   # 4 KiB
    store = TieredStore(16 * per_entry, DiskTier(tmp_path, 1 << 22), high_watermark=0.75, low_watermark=0.5)
    entries = {key(f"s{i}"): make_entry(16, first_id=100 * i) for i in range(14)}
    for k, e in entries.items():
        store.save(k, e)
    store.sync()
    s = store.stats()
    assert s["dram"]["used_bytes"] <= 0.5 * s["dram"]["capacity_bytes"]
    assert s["dram"]["evictions"] >= 6 and s["dram"]["dropped"] == 0
    assert s["disk"]["entries"] >= 6 and s["disk"]["used_bytes"] <= s["disk"]["capacity_bytes"]
    for k, e in entries.items():       # loading brings entries back, demoting others as needed
        assert_same(store.load(k), e)
    assert store.stats()["disk"]["hits"] >= 6
    store.close()


def test_full_disk_drops_least_recently_used(tmp_path):
    per_entry = 64 * TOKEN_BYTES   # 16 KiB
    store = TieredStore(2 * per_entry, DiskTier(tmp_path, 5 * per_entry), policy=LRU(),
                        high_watermark=0.5, low_watermark=0.5)
    entries = {key(f"s{i}"): make_entry(64, first_id=100 * i) for i in range(10)}
    for k, e in entries.items():
        store.save(k, e)
        store.sync()
        s = store.stats()
        assert s["disk"]["used_bytes"] <= s["disk"]["capacity_bytes"]
        assert s["dram"]["used_bytes"] <= s["dram"]["capacity_bytes"]
    s = store.stats()
    assert s["disk"]["evictions"] >= 4
    kept = [k for k in entries if store.lookup(k) is not None]
    assert 2 <= len(kept) <= 4 and kept == list(entries)[-len(kept):], "the oldest sessions leave first"
    for k in reversed(kept):   # a load from disk demotes another session, which may drop one more: counted
        drops = store.stats()["disk"]["evictions"]
        got = store.load(k)
        if got is None:
            assert store.stats()["disk"]["evictions"] > drops - 1 and k != kept[-1]
        else:
            assert_same(got, entries[k])
    store.close()


def test_out_of_space_drops_and_counts(tmp_path, monkeypatch):
    real_pwrite = os.pwrite

    def pwrite(fd, data, offset):
        if os.readlink(f"/proc/self/fd/{fd}").startswith(str(tmp_path)):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_pwrite(fd, data, offset)

    store = TieredStore(8 * 16 * TOKEN_BYTES, DiskTier(tmp_path, 1 << 22), high_watermark=0.5, low_watermark=0.25)
    monkeypatch.setattr(os, "pwrite", pwrite)
    entries = {key(f"s{i}"): make_entry(16, first_id=100 * i) for i in range(8)}
    for k, e in entries.items():
        store.save(k, e)
    store.sync()
    s = store.stats()
    assert s["disk"]["write_errors"] >= 1 and s["dram"]["dropped"] >= 1 and s["disk"]["entries"] == 0
    assert not list(tmp_path.rglob("*.tmp"))
    survivors = 0
    for k, e in entries.items():            # what is left is right; what is gone is a miss
        got = store.load(k)
        assert got is None or torch.equal(got.k, e.k)
        survivors += got is not None
    assert 0 < survivors < len(entries)
    monkeypatch.undo()
    store.save(key("after"), entries[key("s0")])
    store.close()
    store = TieredStore(1 << 20, DiskTier(tmp_path, 1 << 22))
    assert_same(store.load(key("after")), entries[key("s0")])
    store.close()


def test_errors_are_clear():
    store = TieredStore(64 * TOKEN_BYTES, full_timeout_s=0.05)
    with pytest.raises(StoreFullError, match="exceed the DRAM tier"):
        store.save(key(), make_entry(65))
    with pytest.raises(TypeError, match="int64"):
        store.save(key(), KVEntry(torch.arange(4, dtype=torch.int32), torch.randn(L, 4, H, D), torch.randn(L, 4, H, D)))
    with pytest.raises(ValueError, match="num_drop"):
        store.truncate(key(), -1)
    with pytest.raises(ValueError, match="watermark"):
        TieredStore(1 << 16, high_watermark=0.5, low_watermark=0.6)
    store.save(key(), make_entry(8))
    with pytest.raises(ValueError, match="layout"):
        store.save(key(), make_entry(8, dtype=torch.float32), start=8)
    with pytest.raises(StoreFullError, match="pinned or in use"):
        with store.acquire(key()):          # the only entry is leased: nothing may leave
            store.save(key("s1"), make_entry(60))
    store.close()


def test_truncation_is_metadata_only(tmp_path):
    store = TieredStore(1 << 20, DiskTier(tmp_path, 1 << 22))
    a, b = make_entry(40), make_entry(24, first_id=40)
    store.save(key(), a)
    store.save(key(), b, start=40)
    store.flush()
    before = store.stats()
    store.truncate(key(), num_drop=50, keep_first=4)     # drops all of a after 4 tokens, and 10 of b
    after = store.stats()
    for tier in ("dram", "disk"):
        for c in ("bytes_in", "bytes_out", "used_bytes"):
            assert after[tier][c] == before[tier][c], (tier, c)
    keep = torch.cat([torch.arange(4), torch.arange(54, 64)])
    full = KVEntry(torch.cat([a.token_ids, b.token_ids]), torch.cat([a.k, b.k], 1), torch.cat([a.v, b.v], 1))
    want = KVEntry(full.token_ids[keep], full.k[:, keep], full.v[:, keep])
    assert_same(store.load(key()), want)
    store.close()                                        # persists the new manifest only
    assert store.stats()["disk"]["bytes_in"] == before["disk"]["bytes_in"]
    store = TieredStore(1 << 20, DiskTier(tmp_path, 1 << 22))
    assert_same(store.load(key()), want)
    store.close()


def test_lease_is_stable_while_the_session_changes():
    store = TieredStore(1 << 20)
    a = make_entry(20)
    store.save(key(), a)
    lease = store.acquire(key())
    used = store.stats()["dram"]["used_bytes"]
    store.save(key(), make_entry(20, first_id=500))      # replaced while leased
    store.truncate(key(), 5)
    assert_same(KVEntry.from_lease(lease), a)
    assert store.stats()["dram"]["used_bytes"] > used    # the leased chunk stays until released
    lease.release()
    assert store.stats()["dram"]["used_bytes"] == used
    store.close()


class QueuePolicy(LRU):
    """Prefetches the queued sessions that are on disk, soonest first."""

    def update_queue(self, upcoming, **windows):
        self.upcoming = list(upcoming)

    def prefetch(self, on_disk):
        on_disk = set(on_disk)
        return [k for k in self.upcoming if k in on_disk]


def test_update_queue_prefetches_from_disk(tmp_path):
    per_entry = 16 * TOKEN_BYTES
    store = TieredStore(8 * per_entry, DiskTier(tmp_path, 1 << 22), policy=QueuePolicy(),
                        high_watermark=0.75, low_watermark=0.25)
    entries = {key(f"s{i}"): make_entry(16, first_id=100 * i) for i in range(8)}
    for k, e in entries.items():
        store.save(k, e)
    store.sync()
    first = key("s0")          # the oldest: demoted
    assert store.stats()["dram"]["evictions"] >= 1
    assert store.update_queue([first]) == [first]
    store.sync()
    hits = store.stats()["dram"]["hits"]
    assert_same(store.load(first), entries[first])
    s = store.stats()
    assert s["dram"]["hits"] == hits + 1 and s["disk"]["prefetched"] == 1
    store.close()


def test_two_threads_on_different_sessions(tmp_path):
    store = TieredStore(128 << 10, DiskTier(tmp_path, 1 << 24), high_watermark=0.15, low_watermark=0.08)
    errors = []

    def work(name, seed):
        try:
            g = torch.Generator().manual_seed(seed)
            k, model = key(name), make_entry(10, first_id=999_000)
            store.save(k, model)
            for step in range(50):
                r = torch.rand(1, generator=g).item()
                if r < 0.6:
                    new = make_entry(int(torch.randint(1, 9, (1,), generator=g)), first_id=1000 * step)
                    store.save(k, new, start=model.num_tokens)
                    model = KVEntry(torch.cat([model.token_ids, new.token_ids]), torch.cat([model.k, new.k], 1),
                                    torch.cat([model.v, new.v], 1))
                elif r < 0.75 and model.num_tokens > 4:
                    store.truncate(k, 3, keep_first=1)
                    keep = torch.cat([torch.arange(1), torch.arange(4, model.num_tokens)])
                    model = KVEntry(model.token_ids[keep], model.k[:, keep], model.v[:, keep])
                else:
                    assert_same(store.load(k), model)
                time.sleep(0.002)   # a model step: lets background demotions interleave
                if name == "t0" and step % 10 == 9:
                    store.sync()        # a demotion surely completes while the other thread works
            assert_same(store.load(k), model)
        except Exception as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(f"t{i}", i)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert store.stats()["dram"]["evictions"] > 0, "the threads should have raced demotions too"
    store.close()


def test_load_racing_save_of_the_same_session(tmp_path):
    """Every load sees one consistent history: each token's K/V is a function of its id, and ids only grow."""
    layout = KVLayout(L, H, D, torch.float32)

    def kv(ids):
        base = (ids[None, :, None, None] + torch.arange(L * H * D).view(L, 1, H, D)).float()
        return base, -base

    store = TieredStore(256 * layout.token_nbytes, DiskTier(tmp_path, 1 << 24), high_watermark=0.5,
                        low_watermark=0.25)
    k0 = key()
    done, errors, seen = threading.Event(), [], []

    def writer():
        try:
            n, next_id = 0, 0
            for step in range(60):
                if step % 5 == 4 and n > 8:
                    store.truncate(k0, 6, keep_first=2)
                    n -= 6
                else:
                    ids = torch.arange(next_id, next_id + 5)
                    next_id += 5
                    store.save(k0, KVEntry(ids, *kv(ids)), start=n)
                    n += 5
                time.sleep(0.002)
        except Exception as exc:
            errors.append(exc)
        finally:
            done.set()

    def reader():
        try:
            while not done.is_set():
                got = store.load(k0)
                if got is None:
                    continue
                k, v = kv(got.token_ids)
                assert torch.equal(got.k, k) and torch.equal(got.v, v)
                assert bool((got.token_ids[1:] > got.token_ids[:-1]).all())
                seen.append(got.num_tokens)
        except Exception as exc:
            errors.append(exc)

    threads = [threading.Thread(target=writer), threading.Thread(target=reader)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert len(set(seen)) > 3, "the reader should have seen several versions"
    store.close()
