"""Disk tiers that hold their reads back until a test lets them through, or watch how they run; a store
whose sessions are all on disk only; a layer's bytes damaged in a chunk file; and a wait for a condition
that another thread makes true."""
import os
import threading
import time

from cattn.store.lower import fileformat as ff
from cattn.store.lower.disk import DiskTier
from cattn.store.layout import KVLayout
from cattn.store.policy.base import Scheduler
from cattn.store.tiered.store import TieredStore
from tests.store.entries import TOKEN_BYTES, key, make_entry


class GatedDisk(DiskTier):
    """While ``gated``, each chunk payload read waits for a permit; records the chunks it read."""

    def __init__(self, root, capacity):
        super().__init__(root, capacity)
        self.permits, self.gated = threading.Semaphore(0), True
        self.entered, self.read = 0, []

    def read_chunk(self, key, layout, chunk_id, num_tokens, into=None):
        if into is not None and self.gated:
            self.entered += 1
            assert self.permits.acquire(timeout=20), "the test never let this read through"
        out = super().read_chunk(key, layout, chunk_id, num_tokens, into)
        if into is not None:
            self.read.append(chunk_id)
        return out


class GatedLayers(DiskTier):
    """Each layer read of a chunk opened for layer-wise reads waits for a permit; counts whole reads."""

    def __init__(self, root, capacity):
        super().__init__(root, capacity)
        self.permits, self.whole_reads, self.layer_reads = threading.Semaphore(0), 0, 0

    def read_chunk(self, key, layout, chunk_id, num_tokens, into=None):
        self.whole_reads += into is not None
        return super().read_chunk(key, layout, chunk_id, num_tokens, into)

    def open_layers(self, key, layout, chunk_id, num_tokens):
        r = super().open_layers(key, layout, chunk_id, num_tokens)
        if r is not None:
            read_layer, disk = r.read_layer, self

            def gated(layer, into):
                assert disk.permits.acquire(timeout=20), "the test never let this layer through"
                disk.layer_reads += 1
                read_layer(layer, into)
            r.read_layer = gated
        return r


class WatchedDisk(DiskTier):
    """Reads at ``bytes_per_s``; records the order of chunk reads and how many run at once."""

    def __init__(self, root, capacity, bytes_per_s):
        super().__init__(root, capacity)
        self.bytes_per_s = bytes_per_s
        self.order, self.active, self.most = [], 0, 0
        self._lock = threading.Lock()

    def read_chunk(self, key, layout, chunk_id, num_tokens, into=None):
        with self._lock:
            self.active += 1
            self.most = max(self.most, self.active)
            self.order.append(key.session)
        time.sleep(num_tokens * TOKEN_BYTES / self.bytes_per_s)  # long enough for another read to overlap
        try:
            return super().read_chunk(key, layout, chunk_id, num_tokens, into)
        finally:
            with self._lock:
                self.active -= 1


def store_with_sessions_on_disk(tmp_path, sizes, bytes_per_s=100 * 16 * TOKEN_BYTES, dram_bytes=None, **kwargs):
    """A store whose sessions s0, s1, ... (token counts ``sizes``) are all on disk only, with a scheduler
    policy; the disk reads 16 tokens in 10 ms unless told otherwise."""
    disk = WatchedDisk(tmp_path, 1 << 24, bytes_per_s)
    store = TieredStore(dram_bytes or 64 * TOKEN_BYTES * len(sizes), disk, policy=Scheduler(), io_threads=4,
                        high_watermark=1.0, **kwargs)
    entries = {key(f"s{i}"): make_entry(n, first_id=1000 * i) for i, n in enumerate(sizes)}
    for k, e in entries.items():
        store.save(k, e)
    assert not store.flush()
    st = store.state
    with st.lock:  # the pool forgets what the disk holds: every session now needs a read
        for e in st.entries.values():
            for c in e.chunks.values():
                if c.offset is not None:
                    st.pool.free(c.offset, c.extent_nbytes)
                    c.offset = None
    assert store.stats()["dram"]["used_bytes"] == 0
    return store, disk, entries


def corrupt_layer(tmp_path, chunk_index, layer_index):
    """Flip a byte of ``layer_index``'s V in the ``chunk_index``-th chunk file (by token count)."""
    files = sorted((p for p in tmp_path.rglob("*.kv")), key=lambda p: p.stat().st_mtime_ns)
    path = files[chunk_index]
    fd = os.open(path, os.O_RDWR)
    try:
        meta, _, _ = ff.read_frame(fd)
    finally:
        os.close(fd)
    lay = KVLayout.from_json(meta["layout"])
    v_at, _ = lay.layer_spans(meta["num_tokens"])[layer_index][-1]   # its last run: V, or an 8-bit block
    data = bytearray(path.read_bytes())
    data[meta["payload_offset"] + v_at + 3] ^= 0xFF
    path.write_bytes(bytes(data))


def wait_until(cond, what):
    deadline = time.monotonic() + 20
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.002)
