"""AttentionStore: sessions' KV in a pinned host pool over a disk tier, with a pluggable policy.

`TieredStore` is the public face: the `KVStore` contract, zero-copy leases and
pending saves (`saving.py`), the scheduler's hooks (`scheduling.py`), background work
and shutdown. What it knows lives in a `StoreState` (`state.py`, with the locking
rules); histories are views over immutable chunks (`entries.py`); chunks move between
the pool and the lower tier in `migration.py`.
"""
from __future__ import annotations

import logging
import time
from concurrent.futures import Future, ThreadPoolExecutor

import torch

from cattn.store.contract import EntryKey, KVEntry, KVStore, check_key
from cattn.store.device.tier import DeviceTier
from cattn.store.lease import KVLease
from cattn.store.lower.base import LowerTier
from cattn.store.policy.base import LRU, Policy
from cattn.store.prefetch.lane import ReadAhead
from cattn.store.prefetch.partial import dram_prefix
from cattn.store.tiered.arguments import check_arguments
from cattn.store.tiered.entries import Entry, chunks_of, cut, segments_of, token_ids_of
from cattn.store.tiered.layerwise import acquire_layerwise_locked, release_locked
from cattn.store.tiered.migration import persist_locked, promote_locked, read_ids_locked
from cattn.store.tiered.pool import HostPool
from cattn.store.tiered.saving import SavePath
from cattn.store.tiered.scheduling import SchedulingHooks
from cattn.store.tiered.state import StoreState

__all__ = ["TieredStore"]

log = logging.getLogger(__name__)


class TieredStore(SavePath, SchedulingHooks, KVStore):
    """A `KVStore` over a pinned host pool and an optional lower tier; thread-safe.

    Args:
        dram_bytes: capacity of the host pool, allocated (and pinned, if CUDA is available) once.
        disk: the lower tier (a `DiskTier`; a shared `RedisTier`, or `DiskOverShared` of both), or None
            to keep DRAM only (evictions then drop).
            Entries it holds are indexed at construction: a new process finds them.
        policy: chooses victims and prefetches; default `LRU`.
        high_watermark, low_watermark: fractions of ``dram_bytes``; past the high one a background
            thread demotes entries until the pool is at the low one.
        io_threads: background threads for demotion and prefetch (prefetches use one at a time).
        full_timeout_s: how long an allocation that finds every session pinned or in I/O waits for
            one to be released before it raises StoreFullError.
        pin: override pinning of the pool (default: when CUDA is available).
        disk_read_bytes_per_s: the lower tier's read bandwidth, for prefetch deadlines
            (`update_queue`'s ``starts_in``); default: measured on the prefetches.
        device: the tier above DRAM (`cattn.store.device.tier`), a cache of sessions' first layers on the
            accelerator; the store keeps it consistent (truncate, delete, edits, queue) and empties it at
            `close`. ``store.device`` is what `ChatSession` takes resident layers from.
        partial_prefetch: a prefetch is worth the part of it that arrives in time (`cattn.store.prefetch.partial`):
            reads a deadline makes late are issued anyway, soonest first; each reads its session oldest
            chunk first; a job that starts mid-read (`job_started`) stops it after the chunk in flight, and
            the job takes the part in DRAM (`tokens_in_dram`), reads on layer by layer (``acquire(...,
            layerwise=True)``) or prefills the rest. Default False: a read is skipped if late and finished
            once begun.
        max_chunk_tokens: split each save into chunks of at most this many tokens (default: no limit), so
            that a partial prefetch can stop within a long turn's tokens (a chunk is the piece it reads).
        kv_format: how the host tiers keep KV: ``"lossless"`` (default: the model dtype's bytes), or 8-bit,
            ``"int8"`` (recommended) or ``"fp8"`` (e4m3): keys per channel, values per token, scales beside
            them (`cattn.store.kvformat`), about half the bytes in DRAM, on disk, in Redis and over PCIe.
            Quantized when saved, dequantized when loaded into the pages. Entries record their format; one
            in another format (a directory or Redis written by another configuration) is a miss, left in place.

    Keys are `EntryKey`s only (TypeError otherwise). The store owns ``disk``: `close` releases it, and
    so does a constructor that raises (a rejected argument, a tier that cannot be indexed).
    `cattn.store.config.build_store` builds one from a TOML file or ``CATTN_*`` variables.
    """

    def __init__(self, dram_bytes: int, disk: LowerTier | None = None, *, policy: Policy | None = None,
                 high_watermark: float = 0.9, low_watermark: float = 0.7, io_threads: int = 2,
                 full_timeout_s: float = 5.0, pin: bool | None = None, disk_read_bytes_per_s: float | None = None,
                 device: DeviceTier | None = None, partial_prefetch: bool = False,
                 max_chunk_tokens: int | None = None, kv_format: str = "lossless"):
        # The store owns ``disk`` from here on: a constructor that raises releases it (its directory
        # lock), or this process could never open that directory again.
        try:
            check_arguments(dram_bytes, policy, high_watermark, low_watermark, io_threads, full_timeout_s,
                        disk_read_bytes_per_s, partial_prefetch, max_chunk_tokens, kv_format)
            if device is not None and not isinstance(device, DeviceTier):
                raise TypeError(f"device must be a cattn.store.DeviceTier, got {type(device).__name__}")
            self._state = StoreState(HostPool(dram_bytes, pin), disk, policy or LRU(), high_watermark,
                                     low_watermark, full_timeout_s, kv_format)
            self._state.max_chunk_tokens = max_chunk_tokens
        except BaseException:
            if disk is not None:
                disk.close()
            raise
        self.device = device
        self._executor = ThreadPoolExecutor(io_threads, thread_name_prefix="cattn-store")
        self._tasks: set[Future] = set()   # background work not finished yet (guarded by the lock)
        self._readahead = ReadAhead(self._state, self._submit_locked, disk_read_bytes_per_s, partial_prefetch)
        self._state.counters["dram"]["partial_hits"] = 0   # leases of fewer tokens than stored
        self.metrics_server = None   # the Prometheus endpoint `build_store` started for it ([metrics]); `close` stops it

    @property
    def policy(self) -> Policy:
        """Chooses victims and prefetches; the store calls it under its lock only."""
        return self._state.policy

    @property
    def state(self) -> StoreState:
        """What the store knows (index, pool, lower tier, counters) and its lock, for tests and diagnostics:
        reading it takes ``state.lock``, and a change must keep `StoreState`'s rules."""
        return self._state

    @property
    def kv_format(self) -> str:
        """How the host tiers keep KV (the constructor's option)."""
        return self._state.kv_format

    @property
    def partial_prefetch(self) -> bool:
        """Whether a prefetch is worth the part of it that arrives in time (the constructor's option)."""
        return self._readahead.partial

    # ---- KVStore ----------------------------------------------------------------------------------

    def lookup(self, key: EntryKey) -> torch.Tensor | None:
        check_key(key)
        st = self._state
        with st.lock:
            e = st.entries.get(key) or self._find_shared_locked(key)
            if e is None:
                return None
            if not read_ids_locked(st, key, e):
                return None
            return token_ids_of(e.views)

    def load(self, key: EntryKey, num_tokens: int | None = None) -> KVEntry | None:
        check_key(key)
        lease = self.acquire(key, num_tokens)
        if lease is None:
            return None
        with lease:
            return KVEntry.from_lease(lease)

    def truncate(self, key: EntryKey, num_drop: int, keep_first: int = 0) -> None:
        check_key(key)
        if not isinstance(num_drop, int) or not isinstance(keep_first, int) or num_drop < 0 or keep_first < 0:
            raise ValueError(f"num_drop and keep_first must be ints >= 0, got {num_drop!r} and {keep_first!r}")
        if self.device is not None:
            self.device.truncate(key, num_drop, keep_first)
        st = self._state
        with st.lock:
            e = st.entries.get(key)
            if e is None or num_drop == 0 or keep_first >= e.num_tokens:
                return
            n = e.num_tokens
            e.views = cut(e.views, 0, keep_first) + cut(e.views, min(keep_first + num_drop, n), n)
            st.retire_dead_locked(e)
            e.version += 1

    def delete(self, key: EntryKey) -> None:
        check_key(key)
        if self.device is not None:
            self.device.delete(key)
        st = self._state
        with st.lock:
            if (e := st.entries.get(key)) is not None:
                st.remove_locked(key, e)

    def stats(self) -> dict:
        """Counters per tier. ``dram``/``disk``: hits, misses, bytes in/out, evictions, used and capacity
        bytes, entries; ``dram`` also dropped (evicted with no room below); ``disk`` also corrupt (files
        found bad, dropped), skipped (directory entries it did not make or cannot read, left in place),
        write_errors, prefetched, prefetch_stopped (partial prefetch: reads a starting job stopped),
        layerwise_reads (loads that read their chunks from disk one layer at a time), read_bytes_per_s (given, or measured on the prefetches; 0 until known);
        ``transfer``: layer-wise loads and their seconds hidden behind compute vs exposed."""
        st = self._state
        with st.lock:
            out = {tier: dict(c) for tier, c in st.counters.items()}
            out["dram"].update(used_bytes=st.pool.used, capacity_bytes=st.pool.capacity, pinned=st.pool.pinned,
                               entries=sum(any(c.offset is not None for c, _, _ in e.views)
                                           for e in st.entries.values()))
            if st.disk is not None:
                out["disk"].update(used_bytes=st.disk_used, capacity_bytes=st.disk.capacity,
                                   entries=sum(e.manifest is not None for e in st.entries.values()),
                                   read_bytes_per_s=self._readahead.read_bytes_per_s or 0.0)
        if st.disk is not None:   # a shared tier's own counters (no lock: it keeps its own)
            out.update(st.disk.tier_stats())
        if self.device is not None:
            out["device"] = self.device.stats()
        return out

    # ---- zero-copy access --------------------------------------------------------------------------

    def acquire(self, key: EntryKey, num_tokens: int | None = None, *, layerwise: bool = False) -> KVLease | None:
        """The first ``num_tokens`` (default all) tokens of ``key`` as pinned pool views, or None on a miss.

        Chunks on disk are read into the pool first; with ``layerwise``, those on the local disk are read
        one layer at a time behind the lease instead (`cattn.store.tiered.layerwise`: the lease's ``wait_layer``,
        and `HistoryLost` if a layer turns out corrupt). `tokens_in_dram` says how many are served without
        the disk. The lease keeps its chunks in the pool until released; a concurrent save or truncate of
        the session does not change what it shows.
        """
        check_key(key)
        if not isinstance(layerwise, bool):
            raise TypeError(f"layerwise must be a bool, got {layerwise!r}")
        st = self._state
        with st.lock:
            e = st.entries.get(key) or self._find_shared_locked(key)
            if e is None:
                st.count_miss_locked()
                return None
            from_disk = False
            while True:  # the lock is released while chunks are read: the history may change meanwhile
                if layerwise and e.reading is not None:   # a chunk of it in flight (a stopped prefetch): let it land
                    ev = e.reading
                    with st.unlocked():
                        ev.wait()
                    continue
                n = e.num_tokens if num_tokens is None else max(0, min(num_tokens, e.num_tokens))
                views = cut(e.views, 0, n)
                if all(c.offset is not None for c, _, _ in views):
                    break
                from_disk = True
                if layerwise and (lease := acquire_layerwise_locked(
                        st, key, e, views, lambda held: self._locked(release_locked, st, held),
                        st.record_transfer)) is not None:
                    self._count_load_locked(key, e, n, from_disk)
                    return lease
                if not promote_locked(st, key, e, views, evict=True):
                    st.count_miss_locked()
                    return None
            self._count_load_locked(key, e, n, from_disk)
            segments, pinned = segments_of(views, e.layout, st.pool), chunks_of(views)
            for c in pinned:
                c.pins += 1
            ids = token_ids_of(views)
        return KVLease(ids, segments, e.layout, on_release=lambda: self._locked(st.unpin_locked, pinned),
                       on_transfer=st.record_transfer, source="disk" if from_disk else "dram")

    def _count_load_locked(self, key: EntryKey, e: Entry, n: int, from_disk: bool) -> None:
        st = self._state
        st.counters["dram"]["misses" if from_disk else "hits"] += 1
        if from_disk:
            st.counters["disk"]["hits"] += 1
        st.counters["dram"]["bytes_out"] += e.layout.payload_nbytes(n)
        if n < e.num_tokens:
            st.counters["dram"]["partial_hits"] += 1
        st.policy.touch(key, time.time())

    @property
    def disk_read_bytes_per_s(self) -> float | None:
        """The lower tier's read bandwidth: as configured, else as measured by the prefetch lane (None before
        its first read)."""
        return self._readahead.read_bytes_per_s

    def dropped_reason(self, key: EntryKey) -> str | None:
        check_key(key)
        with self._state.lock:
            return None if key in self._state.entries else self._state.dropped.get(key)

    def tokens_in_dram(self, key: EntryKey) -> int:
        """How many of ``key``'s first tokens are in the DRAM tier now (0 on a miss): what `acquire` serves
        without reading the disk."""
        check_key(key)
        with self._state.lock:
            e = self._state.entries.get(key)
            if e is None:
                return 0
            return sum(hi - lo for _, lo, hi in dram_prefix(e.views))

    def _find_shared_locked(self, key: EntryKey) -> Entry | None:
        """A session this store does not index but a shared lower tier holds (saved by another machine);
        releases the lock while it asks. None on a miss (counted by the tier)."""
        st = self._state
        if st.disk is None or not st.disk.finds_shared:
            return None
        with st.unlocked():
            found = st.disk.find(key)
        if found is None or key in st.entries:   # another thread may have indexed or saved it meanwhile
            return st.entries.get(key)
        if not st.serves(found.layout):          # another format's: a miss, left for its own readers
            st.counters["disk"]["other_format"] += 1
            return None
        e = st.index_locked(found)
        st.policy.touch(key, time.time())
        return e

    def _locked(self, fn, *args) -> None:
        """``fn(*args)`` under the lock: the callbacks of leases and pending saves come without it."""
        with self._state.lock:
            fn(*args)

    # ---- background work and shutdown --------------------------------------------------------------

    def _submit_locked(self, fn, *args) -> None:
        """Run ``fn(*args)`` in a background thread; `sync` waits for it."""
        def run():  # its `finally` waits for the lock the submitter holds, so `future` is bound by then
            try:
                fn(*args)
            except Exception:  # a background failure must not vanish silently
                log.exception("store background task failed")
            finally:
                with self._state.lock:
                    self._tasks.discard(future)
                    self._state.cond.notify_all()
        future = self._executor.submit(run)
        self._tasks.add(future)

    def sync(self) -> None:
        """Wait until background demotions, prefetches and layer-wise reads have finished."""
        while True:
            with self._state.lock:
                tasks, reads = list(self._tasks), list(self._state.layer_reads)
            if not tasks and not reads:
                return
            for t in tasks:
                t.exception()
            for r in reads:
                r.join()

    def flush(self) -> list[EntryKey]:
        """Write every entry's current history to the lower tier (what a restart will find); returns the
        sessions it could not write (no room, or a write error: see ``stats()["disk"]["write_errors"]``)."""
        st, failed = self._state, []
        if st.disk is None:
            return failed
        with st.lock:
            for key, e in list(st.entries.items()):
                while e.io or e.reading is not None:
                    st.cond.wait()
                if st.entries.get(key) is e and not persist_locked(st, key, e):
                    log.warning("could not write session %r to the lower tier", key.session)
                    failed.append(key)
        return failed

    def close(self, persist: bool = True) -> None:
        """Finish background work, `flush` if ``persist``, release the lower tier. The store is unusable after.

        A session `flush` cannot write is dropped from the lower tier too (counted in ``dropped``), so
        that the next process never finds an older history of it after a clean shutdown."""
        self.sync()
        if self.device is not None:
            self.device.clear()
        st = self._state
        if persist:
            failed = self.flush()
            with st.lock:
                for key in failed:
                    if (e := st.entries.get(key)) is not None:
                        st.remove_locked(key, e, evicted_from="dram")
        self._executor.shutdown(wait=True)
        if st.disk is not None:
            st.disk.close()
        if self.metrics_server is not None:   # build_store's [metrics]
            self.metrics_server.shutdown()
            self.metrics_server.server_close()
