"""AttentionStore: sessions' KV in a pinned host pool over a disk tier, with a pluggable policy.

`TieredStore` is the public face: the `KVStore` contract, zero-copy leases and
pending saves, the scheduler's hooks, background work and shutdown. What it
knows lives in a `StoreState` (`state.py`, with the locking rules); histories
are views over immutable chunks (`entries.py`); chunks move between the pool
and the lower tier in `migration.py`.
"""
from __future__ import annotations

import logging
import time
from collections.abc import Hashable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor

import torch

from cattn.store.lower import fileformat as ff
from cattn.store.tiered.arguments import check_arguments
from cattn.store.contract import EntryKey, KVEntry, KVStore, check_key
from cattn.store.device.tier import DeviceTier
from cattn.store.tiered.entries import Chunk, Entry, chunks_of, cut, segments_of, token_ids_of
from cattn.store.layout import KVLayout
from cattn.store.lease import KVLease, PendingSave, Segment
from cattn.store.tiered.migration import (StoreFullError, allocate_tokens_locked, demote_to_low_watermark,
                                   persist_locked, promote_locked, read_ids_locked)
from cattn.store.tiered.layerwise import acquire_layerwise_locked, release_locked
from cattn.store.prefetch.partial import dram_prefix
from cattn.store.policy.base import LRU, Policy
from cattn.store.tiered.pool import HostPool
from cattn.store.prefetch.lane import ReadAhead
from cattn.store.lower.over_shared import publish
from cattn.store.tiered.state import StoreState
from cattn.store.lower.base import LowerTier

__all__ = ["StoreFullError", "TieredStore"]

log = logging.getLogger(__name__)


class TieredStore(KVStore):
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

    Keys are `EntryKey`s only (TypeError otherwise). The store owns ``disk``: `close` releases it, and
    so does a constructor that raises (a rejected argument, a tier that cannot be indexed).
    """

    def __init__(self, dram_bytes: int, disk: LowerTier | None = None, *, policy: Policy | None = None,
                 high_watermark: float = 0.9, low_watermark: float = 0.7, io_threads: int = 2,
                 full_timeout_s: float = 5.0, pin: bool | None = None, disk_read_bytes_per_s: float | None = None,
                 device: DeviceTier | None = None, partial_prefetch: bool = False,
                 max_chunk_tokens: int | None = None):
        # The store owns ``disk`` from here on: a constructor that raises releases it (its directory
        # lock), or this process could never open that directory again.
        try:
            check_arguments(dram_bytes, policy, high_watermark, low_watermark, io_threads, full_timeout_s,
                        disk_read_bytes_per_s, partial_prefetch, max_chunk_tokens)
            if device is not None and not isinstance(device, DeviceTier):
                raise TypeError(f"device must be a cattn.store.DeviceTier, got {type(device).__name__}")
            self._state = StoreState(HostPool(dram_bytes, pin), disk, policy or LRU(), high_watermark,
                                     low_watermark, full_timeout_s)
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

    @classmethod
    def from_config(cls, config=None, **kwargs) -> TieredStore:
        """A store as ``config`` says: a `cattn.store.config.StoreConfig`, a TOML file's path, or
        None for the ``CATTN_*`` environment (see docs/store.md); ``kwargs`` override the store's options."""
        from cattn.store.config import build_store

        return build_store(config, **kwargs)

    @property
    def policy(self) -> Policy:
        """Chooses victims and prefetches; the store calls it under its lock only."""
        return self._state.policy

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
            return lease.to_entry()

    def save(self, key: EntryKey, entry: KVEntry, start: int = 0) -> None:
        check_key(key)
        pending = self.begin_save(key, entry.token_ids.cpu(), KVLayout.of(entry), start)
        try:
            pending.write(entry.k, entry.v)
        except BaseException:
            pending.abort()
            raise
        pending.commit()

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
        if hasattr(st.disk, "tier_stats"):   # the shared tier's own counters (no lock: it keeps its own)
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
                       on_transfer=st.record_transfer)

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

    def tokens_in_dram(self, key: EntryKey) -> int:
        """How many of ``key``'s first tokens are in the DRAM tier now (0 on a miss): what `acquire` serves
        without reading the disk."""
        check_key(key)
        with self._state.lock:
            e = self._state.entries.get(key)
            if e is None:
                return 0
            return sum(hi - lo for _, lo, hi in dram_prefix(e.views))

    def begin_save(self, key: EntryKey, token_ids: torch.Tensor, layout: KVLayout, start: int = 0) -> PendingSave:
        """Reserve pool space for ``token_ids [m] int64``'s KV; see `PendingSave`. Committing it is `save`.

        Raises StoreFullError if the pool cannot make room. ``start`` and ``layout`` are checked
        against the stored entry at commit (ValueError), since an earlier turn's save may still be
        in flight when the next one begins.
        """
        check_key(key)
        if not isinstance(token_ids, torch.Tensor) or token_ids.ndim != 1 or token_ids.dtype != torch.int64:
            raise TypeError(f"token_ids must be a 1-D int64 tensor, got {getattr(token_ids, 'shape', token_ids)!r}")
        if not isinstance(start, int) or start < 0:
            raise ValueError(f"start must be an int >= 0, got {start!r}")
        st, m = self._state, token_ids.numel()
        if layout.extent_nbytes(m) > st.pool.capacity:
            raise StoreFullError(f"{layout.payload_nbytes(m)} bytes of KV exceed the DRAM tier's "
                                 f"{st.pool.capacity} bytes")
        with st.lock:
            pieces = allocate_tokens_locked(st, layout, m)
        chunks, segments, pos = [], [], 0
        for offset, n in pieces:
            chunks.append(Chunk(ff.new_id(), n, token_ids[pos:pos + n].clone(), offset, layout.extent_nbytes(n)))
            segments.append(Segment(pos, *layout.views(st.pool.view(offset, layout.payload_nbytes(n)), n)))
            pos += n
        return PendingSave(token_ids, start, segments, commit=lambda: self._commit(key, layout, start, chunks),
                           abort=lambda: self._locked(st.free_new_locked, chunks))

    def _commit(self, key: EntryKey, layout: KVLayout, start: int, chunks: list[Chunk]) -> None:
        """Make ``chunks`` the history of ``key`` after its first ``start`` tokens; past the high
        watermark, start the background demotion."""
        st = self._state
        with st.lock:
            try:
                e = self._check_start_locked(key, layout, start)
            except ValueError:
                st.free_new_locked(chunks)
                raise
            if e is None:
                e = st.entries[key] = Entry(layout, ff.new_id(), time.time_ns())
            e.layout = layout  # a change only if start == 0, and then every old chunk retires below
            e.views = cut(e.views, 0, start) + [(c, 0, c.num_tokens) for c in chunks]
            e.chunks.update((c.id, c) for c in chunks)
            e.prefetch_stopped = False   # the turn that stopped the read saved: the lane may read it again
            st.retire_dead_locked(e)
            e.version += 1
            st.counters["dram"]["bytes_in"] += layout.payload_nbytes(sum(c.num_tokens for c in chunks))
            if self.device is not None:  # resident tokens past ``start`` are no longer the history
                self.device.trim(key, start)
            st.policy.touch(key, time.time())
            st.policy.sized(key, layout.payload_nbytes(e.num_tokens))
            if st.pool.used > st.high_bytes and not st.demoting:
                st.demoting = True
                self._submit_locked(demote_to_low_watermark, st)
            if getattr(st.disk, "write_through", False):  # a shared tier: the next turn may run elsewhere
                self._submit_locked(publish, st, key)

    def _check_start_locked(self, key: EntryKey, layout: KVLayout, start: int) -> Entry | None:
        e = self._state.entries.get(key)
        have = 0 if e is None else e.num_tokens
        if start > have:
            raise ValueError(f"start={start} but only {have} tokens of session {key.session!r} are stored")
        if e is not None and start > 0 and e.layout != layout:
            raise ValueError(f"layout {layout} differs from the stored {e.layout} of session {key.session!r}")
        return e

    def _find_shared_locked(self, key: EntryKey) -> Entry | None:
        """A session this store does not index but a shared lower tier holds (saved by another machine);
        releases the lock while it asks. None on a miss (counted by the tier)."""
        st = self._state
        if not hasattr(st.disk, "find"):
            return None
        with st.unlocked():
            found = st.disk.find(key)
        if found is None or key in st.entries:   # another thread may have indexed or saved it meanwhile
            return st.entries.get(key)
        e = st.index_locked(found)
        st.policy.touch(key, time.time())
        return e

    def _locked(self, fn, *args) -> None:
        """``fn(*args)`` under the lock: the callbacks of leases and pending saves come without it."""
        with self._state.lock:
            fn(*args)

    # ---- scheduling hooks --------------------------------------------------------------------------

    def update_queue(self, upcoming: Sequence[Hashable], *, prefetch_window: int | None = None,
                     eviction_window: int | None = None, starts_in: Sequence[float] | None = None) -> list[EntryKey]:
        """The job queue changed: tell the policy, drop what it says has expired, then `prefetch`.

        Args:
            upcoming: the session key of each queued job, soonest first (a session once per job).
            prefetch_window, eviction_window: the policy's look-ahead windows, in jobs
                (`cattn.replay.queue.JobQueue.windows`); None: the whole queue.
            starts_in: seconds from now until each queued job is expected to start (one per entry of
                ``upcoming``). With it, a prefetch the disk cannot finish in time is not read, and the
                reads kept are the most that can be on time (`cattn.store.prefetch.deadlines.on_time`).

        Returns:
            the prefetch plan: the keys to read from disk, in order.
        """
        for k in upcoming:
            check_key(k, "upcoming[i]")
        st = self._state
        with st.lock:
            self._readahead.set_due_locked(upcoming, starts_in)  # checks starts_in before anything changes
            st.policy.update_queue(upcoming, prefetch_window=prefetch_window, eviction_window=eviction_window)
            if self.device is not None:
                self.device.update_queue(upcoming, prefetch_window=prefetch_window, eviction_window=eviction_window)
            now = time.time()
            for key in st.policy.expired([k for k, e in st.entries.items() if not e.busy()], now):
                if (e := st.entries.get(key)) is not None and not e.busy():
                    st.remove_locked(key, e, evicted_from="disk" if e.disk_nbytes else "dram")
        plan = self.prefetch()
        if self.device is not None:   # demoted sessions with a job soon come back up from DRAM (not disk)
            with st.lock:
                in_dram = {k for k, e in st.entries.items() if all(c.offset is not None for c, _, _ in e.views)}
            self.device.prefetch(self, in_dram)
        return plan

    def job_started(self, key: EntryKey) -> None:
        """Tell the policy that ``key``'s job left the queue and started (its deadline is gone; with
        ``partial_prefetch``, a read of it in flight stops after its chunk in flight)."""
        check_key(key)
        if self.device is not None:
            self.device.job_started(key)
        with self._state.lock:
            self._readahead.started_locked(key)
            self._state.policy.start(key, time.time())

    def prefetch(self) -> list[EntryKey]:
        """Read the policy's `prefetch` choices from disk into DRAM in the background, one at a time
        (`cattn.store.prefetch.lane`), below the high watermark, demoting only sessions the policy values
        less than the one read; returns the plan (the keys to read, in order)."""
        with self._state.lock:
            return self._readahead.kick_locked()

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
        if (server := getattr(self, "metrics_server", None)) is not None:   # from_config's [metrics]
            server.shutdown()
            server.server_close()
