"""What a `TieredStore` knows, under its one lock: the index of entries, the pool, the disk's accounting.

Locking: ``lock`` guards every field here and every `Entry` and `Chunk`, and is
never held during bulk copies or file I/O (`unlocked`); each entry's
``io_lock`` serialises the file operations of that entry (taken without the
main lock held); ``io`` > 0 or pinned chunks keep an entry from being chosen
as a victim. ``cond`` is notified whenever pool room, a pin or an entry's I/O
is released, which is what a thread waiting for room waits for.
"""
from __future__ import annotations

import logging
import threading
from collections.abc import Iterable
from contextlib import contextmanager

from cattn.store.contract import EntryKey
from cattn.store.kvformat.names import LOSSLESS
from cattn.store.layout import KVLayout
from cattn.store.tiered.entries import Chunk, Entry
from cattn.store.policy.base import Policy
from cattn.store.tiered.pool import HostPool
from cattn.store.lower.base import LowerTier

log = logging.getLogger(__name__)


class StoreState:
    """The shared state of a `TieredStore` and the edits of it that keep the accounting exact.

    Methods named ``*_locked`` expect ``lock`` held; some release it for a while (see each).
    """

    def __init__(self, pool: HostPool, disk: LowerTier | None, policy: Policy, high_watermark: float,
                 low_watermark: float, full_timeout_s: float, kv_format: str = LOSSLESS):
        self.pool, self.disk, self.policy = pool, disk, policy
        self.kv_format = kv_format       # how this store keeps KV (`KVLayout.stored_as`); it serves no other
        self.high_bytes, self.low_bytes = high_watermark * pool.capacity, low_watermark * pool.capacity
        self.full_timeout_s = full_timeout_s
        self.lock = threading.Lock()
        self.cond = threading.Condition(self.lock)
        self.entries: dict[EntryKey, Entry] = {}
        self.disk_used = 0
        self.demoting = False            # a background demotion is queued or running
        self.layer_reads: set[threading.Thread] = set()   # layer-wise reads from disk in flight (`layerwise`)
        self.max_chunk_tokens: int | None = None   # a save is split into chunks of at most this many tokens
        self.dropped: dict[EntryKey, str] = {}    # sessions dropped as corrupt, with why (`dropped_reason`)
        self.counters = {"dram": dict(hits=0, misses=0, bytes_in=0, bytes_out=0, evictions=0, dropped=0),
                         "transfer": dict(loads=0, bytes=0, load_s_hidden=0.0, load_s_exposed=0.0)}
        if disk is not None:
            self.counters["disk"] = dict(hits=0, misses=0, bytes_in=0, bytes_out=0, evictions=0, corrupt=0,
                                         write_errors=0, prefetched=0, prefetch_stopped=0,
                                         layerwise_reads=0, other_format=0)
            self._index_lower_tier()

    def _index_lower_tier(self) -> None:
        """Index what the lower tier holds (what an earlier process left), oldest first for the policy."""
        stored, bad = self.disk.scan()
        self.counters["disk"]["corrupt"] += bad
        self.dropped.update(self.disk.dropped)
        # Entries a directory-backed tier left in place (not its own, or unreadable); others have none.
        self.counters["disk"]["skipped"] = self.disk.skipped
        for s in sorted(stored, key=lambda s: s.created_ns):
            if not self.serves(s.layout):   # left where it is, for a store of its format: a miss here
                self.counters["disk"]["other_format"] += 1
                continue
            self.index_locked(s)
            self.policy.touch(s.key, s.created_ns / 1e9)

    def serves(self, layout: KVLayout) -> bool:
        """Whether an entry stored in ``layout`` is in this store's format (one in another is never served:
        its reader would expect other bytes)."""
        return layout == layout.stored_as(self.kv_format)

    def index_locked(self, s) -> Entry:
        """Index a session the lower tier holds (a `StoredEntry`: on disk at a restart, or found in the
        shared tier), its chunks on that tier only and its token ids unread."""
        e = Entry(s.layout, s.incarnation, s.created_ns, version=s.version, manifest=(s.version, s.manifest_nbytes))
        e.chunks = {cid: Chunk(cid, m, None, extent_nbytes=s.layout.extent_nbytes(m), file_nbytes=nb)
                    for cid, (m, nb) in s.chunks.items()}
        e.views = [(e.chunks[cid], lo, hi) for cid, lo, hi in s.views]
        self.entries[s.key] = e
        self.disk_used += e.disk_nbytes
        return e

    def count_miss_locked(self) -> None:
        self.counters["dram"]["misses"] += 1
        if self.disk is not None:
            self.counters["disk"]["misses"] += 1

    def record_transfer(self, hidden_s: float, exposed_s: float, nbytes: int) -> None:
        """A finished layer-wise load (`KVLease.record_transfer`); takes the lock."""
        with self.lock:
            t = self.counters["transfer"]
            t["loads"] += 1
            t["bytes"] += nbytes
            t["load_s_hidden"] += hidden_s
            t["load_s_exposed"] += exposed_s

    @contextmanager
    def unlocked(self):
        """Release ``lock`` for a bulk copy or file I/O; whatever was read before may change meanwhile."""
        self.lock.release()
        try:
            yield
        finally:
            self.lock.acquire()

    # ---- chunk lifetime -------------------------------------------------------------------------------

    def free_dram_locked(self, c: Chunk) -> None:
        """Give ``c``'s extent back to the pool (the caller checked it is there and unpinned)."""
        self.pool.free(c.offset, c.extent_nbytes)
        c.offset = None

    def retire_locked(self, c: Chunk) -> None:
        """``c`` left its entry's history: free its DRAM now, or at its last unpin."""
        c.live = False
        if c.offset is not None and c.pins == 0:
            self.free_dram_locked(c)

    def retire_dead_locked(self, e: Entry) -> None:
        """Retire the chunks no view of ``e`` names any more; forget those no file is left of (a file a
        committed manifest names goes at the next manifest)."""
        live = {id(c) for c, _, _ in e.views}
        for c in list(e.chunks.values()):
            if id(c) not in live:
                self.retire_locked(c)
                if c.offset is None and c.file_nbytes == 0:
                    del e.chunks[c.id]

    def unpin_locked(self, chunks: Iterable[Chunk]) -> None:
        for c in chunks:
            c.pins -= 1
            if c.pins == 0 and not c.live and c.offset is not None:
                self.free_dram_locked(c)
        self.cond.notify_all()

    def free_new_locked(self, chunks: Iterable[Chunk]) -> None:
        """Give back the extents of chunks that never joined a history (an aborted or refused save)."""
        for c in chunks:
            self.free_dram_locked(c)
        self.cond.notify_all()

    # ---- leaving the index ----------------------------------------------------------------------------

    def remove_locked(self, key: EntryKey, e: Entry, evicted_from: str | None = None) -> None:
        """Take ``e`` out of the index, free its DRAM (pinned chunks at unpin), remove its files; releases
        ``lock`` while it waits for the entry's I/O in flight and removes the files."""
        del self.entries[key]
        e.removed = True
        self.policy.forget(key)
        if evicted_from is not None:
            self.counters[evicted_from]["evictions"] += 1
        if evicted_from == "dram":  # out of DRAM with nowhere to go
            self.counters["dram"]["dropped"] += 1
        for c in e.chunks.values():
            self.retire_locked(c)
        if self.disk is not None:
            try:
                with self.unlocked(), e.io_lock:  # waits for this entry's writes or reads in flight
                    self.disk.remove(key, e.incarnation, list(e.chunks), manifest=True)
            except OSError as exc:
                log.warning("removing session %r from the lower tier failed: %s", key.session, exc)
            self.disk_used -= e.disk_nbytes
            for c in e.chunks.values():
                c.file_nbytes = 0
            e.manifest = None
        self.cond.notify_all()

    def corrupt_locked(self, key: EntryKey, e: Entry, exc: Exception) -> bool:
        """Drop an entry whose stored bytes cannot be vouched for; False (the lookup is a miss)."""
        if not e.removed:  # else the files went with a delete that came first: not corruption
            log.warning("session %r: stored KV unusable (%s); dropped", key.session, exc)
            self.counters["disk"]["corrupt"] += 1
            self.dropped[key] = f"its stored KV is unusable ({exc})"
            self.remove_locked(key, e)
        return False
