"""AttentionStore: sessions' KV in a pinned host pool over a disk tier, with a pluggable policy.

An entry's history is a list of token ranges (``views``) over immutable chunks;
a save adds a chunk holding only the new tokens, a truncation edits the ranges,
and neither moves stored bytes. A chunk lives in the DRAM pool, in the lower
tier (disk), or both. Past the high watermark a background thread demotes the
policy's victims to disk until the low watermark; when the disk is full the
policy's disk victims are dropped. Loading an entry whose chunks are on disk
reads them back into the pool first.

Locking: one lock guards all metadata and is never held during bulk copies or
file I/O; each entry's ``io_lock`` serialises the file operations of that entry
(taken without the main lock held); ``io`` > 0 or pinned chunks keep an entry
from being chosen as a victim.
"""
from __future__ import annotations

import logging
import threading
import time
from collections.abc import Hashable, Iterable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

from cattn.store import fileformat as ff
from cattn.store.base import EntryKey, KVEntry, KVStore
from cattn.store.layout import KVLayout
from cattn.store.lease import KVLease, PendingSave, Segment
from cattn.store.policy import LRU, Policy
from cattn.store.pool import HostPool
from cattn.store.tier import LowerTier

log = logging.getLogger(__name__)


class StoreFullError(RuntimeError):
    """The host pool cannot hold what was asked even after evicting everything it may evict."""


@dataclass(eq=False)
class _Chunk:
    id: str
    num_tokens: int
    token_ids: torch.Tensor | None   # None until read from the lower tier (after a restart)
    offset: int | None = None        # host pool extent; None when not in DRAM
    extent_nbytes: int = 0           # its size
    file_nbytes: int = 0             # bytes in the lower tier; 0 when not there
    pins: int = 0                    # leases and writes reading the extent
    live: bool = True                # part of its entry's history (a dead one waits for unpin or manifest)


@dataclass(eq=False)
class _Entry:
    layout: KVLayout
    incarnation: str                 # names the manifest; a deleted and re-created session gets a new one
    created_ns: int
    views: list[tuple[_Chunk, int, int]] = field(default_factory=list)   # (chunk, lo, hi), in token order
    chunks: dict[str, _Chunk] = field(default_factory=dict)              # every chunk holding bytes anywhere
    version: int = 0
    manifest: tuple[int, int] | None = None    # (version, bytes) of the committed manifest
    io: int = 0
    io_lock: threading.Lock = field(default_factory=threading.Lock)
    reading: threading.Event | None = None     # a promotion to DRAM is in flight
    removed: bool = False

    @property
    def num_tokens(self) -> int:
        return sum(hi - lo for _, lo, hi in self.views)

    @property
    def disk_nbytes(self) -> int:
        return sum(c.file_nbytes for c in self.chunks.values()) + (self.manifest[1] if self.manifest else 0)

    def busy(self) -> bool:
        return self.io > 0 or self.reading is not None or any(c.pins for c in self.chunks.values())


def _cut(views: list, start: int, stop: int) -> list:
    """The views of tokens ``[start, stop)``."""
    out, pos = [], 0
    for c, lo, hi in views:
        a, b = max(start - pos, 0), min(stop - pos, hi - lo)
        if a < b:
            out.append((c, lo + a, lo + b))
        pos += hi - lo
    return out


class TieredStore(KVStore):
    """A `KVStore` over a pinned host pool and an optional lower tier; thread-safe.

    Args:
        dram_bytes: capacity of the host pool, allocated (and pinned, if CUDA is available) once.
        disk: the lower tier (a `DiskTier`), or None to keep DRAM only (evictions then drop).
            Entries it holds are indexed at construction: a new process finds them.
        policy: chooses victims and prefetches; default `LRU`.
        high_watermark, low_watermark: fractions of ``dram_bytes``; past the high one a background
            thread demotes entries until the pool is at the low one.
        io_threads: background threads for demotion and prefetch.
        full_timeout_s: how long an allocation that finds every session pinned or in I/O waits for
            one to be released before it raises StoreFullError.
        pin: override pinning of the pool (default: when CUDA is available).
    """

    def __init__(self, dram_bytes: int, disk: LowerTier | None = None, *, policy: Policy | None = None,
                 high_watermark: float = 0.9, low_watermark: float = 0.7, io_threads: int = 2,
                 full_timeout_s: float = 5.0, pin: bool | None = None):
        if not 0 < low_watermark <= high_watermark <= 1:
            raise ValueError(f"need 0 < low_watermark <= high_watermark <= 1, got {low_watermark}, {high_watermark}")
        if io_threads < 1:
            raise ValueError(f"io_threads must be >= 1, got {io_threads}")
        self._pool = HostPool(dram_bytes, pin)
        self._disk, self.policy = disk, policy or LRU()
        self._high, self._low = high_watermark * self._pool.capacity, low_watermark * self._pool.capacity
        self._full_timeout_s = full_timeout_s
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self._entries: dict[EntryKey, _Entry] = {}
        self._disk_used = 0
        self._executor = ThreadPoolExecutor(io_threads, thread_name_prefix="cattn-store")
        self._tasks: set[Future] = set()
        self._demoting = False
        self._counters = {"dram": dict(hits=0, misses=0, bytes_in=0, bytes_out=0, evictions=0, dropped=0),
                          "transfer": dict(loads=0, bytes=0, load_s_hidden=0.0, load_s_exposed=0.0)}
        if disk is not None:
            self._counters["disk"] = dict(hits=0, misses=0, bytes_in=0, bytes_out=0, evictions=0, corrupt=0,
                                          write_errors=0, prefetched=0)
            self._index_lower_tier()

    def _index_lower_tier(self) -> None:
        stored, bad = self._disk.scan()
        self._counters["disk"]["corrupt"] += bad
        for s in sorted(stored, key=lambda s: s.created_ns):
            e = _Entry(s.layout, s.incarnation, s.created_ns, version=s.version,
                       manifest=(s.version, s.manifest_nbytes))
            e.chunks = {cid: _Chunk(cid, m, None, extent_nbytes=s.layout.extent_nbytes(m), file_nbytes=nb)
                        for cid, (m, nb) in s.chunks.items()}
            e.views = [(e.chunks[cid], lo, hi) for cid, lo, hi in s.views]
            self._entries[s.key] = e
            self._disk_used += e.disk_nbytes
            self.policy.touch(s.key, s.created_ns / 1e9)

    # ---- KVStore ----------------------------------------------------------------------------------

    def lookup(self, key: EntryKey) -> torch.Tensor | None:
        with self._lock:
            e = self._entries.get(key)
            if e is None or not self._ensure_ids_locked(key, e):
                return None
            return torch.cat([c.token_ids[lo:hi] for c, lo, hi in e.views]) if e.views else \
                torch.empty(0, dtype=torch.int64)

    def load(self, key: EntryKey, num_tokens: int | None = None) -> KVEntry | None:
        lease = self.acquire(key, num_tokens)
        if lease is None:
            return None
        with lease:
            return lease.to_entry()

    def save(self, key: EntryKey, entry: KVEntry, start: int = 0) -> None:
        pending = self.begin_save(key, entry.token_ids.cpu(), KVLayout.of(entry), start)
        try:
            pending.write(entry.k, entry.v)
        except BaseException:
            pending.abort()
            raise
        pending.commit()

    def truncate(self, key: EntryKey, num_drop: int, keep_first: int = 0) -> None:
        if not isinstance(num_drop, int) or not isinstance(keep_first, int) or num_drop < 0 or keep_first < 0:
            raise ValueError(f"num_drop and keep_first must be ints >= 0, got {num_drop!r} and {keep_first!r}")
        with self._lock:
            e = self._entries.get(key)
            if e is None or num_drop == 0 or keep_first >= e.num_tokens:
                return
            n = e.num_tokens
            e.views = _cut(e.views, 0, keep_first) + _cut(e.views, min(keep_first + num_drop, n), n)
            self._retire_dead_locked(e)
            e.version += 1

    def delete(self, key: EntryKey) -> None:
        with self._lock:
            e = self._entries.get(key)
            if e is not None:
                self._remove_locked(key, e)

    def stats(self) -> dict:
        """Counters per tier. ``dram``/``disk``: hits, misses, bytes in/out, evictions, used and capacity
        bytes, entries; ``dram`` also dropped (evicted with no room below); ``disk`` also corrupt (files
        found bad, dropped), write_errors, prefetched;
        ``transfer``: layer-wise loads and their seconds hidden behind compute vs exposed."""
        with self._lock:
            out = {tier: dict(c) for tier, c in self._counters.items()}
            out["dram"].update(used_bytes=self._pool.used, capacity_bytes=self._pool.capacity,
                               pinned=self._pool.pinned, entries=sum(
                                   any(c.offset is not None for c, _, _ in e.views) for e in self._entries.values()))
            if self._disk is not None:
                out["disk"].update(used_bytes=self._disk_used, capacity_bytes=self._disk.capacity,
                                   entries=sum(e.manifest is not None for e in self._entries.values()))
            return out

    # ---- zero-copy access --------------------------------------------------------------------------

    def acquire(self, key: EntryKey, num_tokens: int | None = None) -> KVLease | None:
        """The first ``num_tokens`` (default all) tokens of ``key`` as pinned pool views, or None on a miss.

        Chunks on disk are read into the pool first. The lease keeps its chunks in the pool until
        released; a concurrent save or truncate of the session does not change what it shows.
        """
        with self._lock:
            e = self._entries.get(key)
            if e is None:
                self._count_miss()
                return None
            from_disk = False
            while True:  # the lock is released while chunks are read: the history may change meanwhile
                n = e.num_tokens if num_tokens is None else max(0, min(num_tokens, e.num_tokens))
                views = _cut(e.views, 0, n)
                if all(c.offset is not None for c, _, _ in views):
                    break
                from_disk = True
                if not self._ensure_dram_locked(key, e, views, evict=True):
                    self._count_miss()
                    return None
            self._counters["dram"]["misses" if from_disk else "hits"] += 1
            if from_disk:
                self._counters["disk"]["hits"] += 1
            segments, pinned, pos = [], [], 0
            for c, lo, hi in views:
                k, v = e.layout.views(self._pool.view(c.offset, e.layout.payload_nbytes(c.num_tokens)), c.num_tokens)
                segments.append(Segment(pos, k[:, lo:hi], v[:, lo:hi]))
                pinned.append(c)
                c.pins += 1
                pos += hi - lo
            ids = torch.cat([c.token_ids[lo:hi] for c, lo, hi in views]) if n else torch.empty(0, dtype=torch.int64)
            self._counters["dram"]["bytes_out"] += e.layout.payload_nbytes(n)
            self.policy.touch(key, time.time())
        return KVLease(ids, segments, e.layout, on_release=lambda: self._unpin(pinned),
                       on_transfer=self._record_transfer)

    def begin_save(self, key: EntryKey, token_ids: torch.Tensor, layout: KVLayout, start: int = 0) -> PendingSave:
        """Reserve pool space for ``token_ids [m] int64``'s KV; see `PendingSave`. Committing it is `save`.

        Raises StoreFullError if the pool cannot make room. ``start`` and ``layout`` are checked
        against the stored entry at commit (ValueError), since an earlier turn's save may still be
        in flight when the next one begins.
        """
        if not isinstance(token_ids, torch.Tensor) or token_ids.ndim != 1 or token_ids.dtype != torch.int64:
            raise TypeError(f"token_ids must be a 1-D int64 tensor, got {getattr(token_ids, 'shape', token_ids)!r}")
        if not isinstance(start, int) or start < 0:
            raise ValueError(f"start must be an int >= 0, got {start!r}")
        m = token_ids.numel()
        if layout.extent_nbytes(m) > self._pool.capacity:
            raise StoreFullError(f"{layout.payload_nbytes(m)} bytes of KV exceed the DRAM tier's "
                                 f"{self._pool.capacity} bytes")
        with self._lock:
            pieces = self._allocate_tokens_locked(layout, m)
        chunks, segments, pos = [], [], 0
        for offset, n in pieces:
            chunks.append(_Chunk(ff.new_id(), n, token_ids[pos:pos + n].clone(), offset, layout.extent_nbytes(n)))
            segments.append(Segment(pos, *layout.views(self._pool.view(offset, layout.payload_nbytes(n)), n)))
            pos += n
        return PendingSave(token_ids, start, segments, commit=lambda: self._commit(key, layout, start, chunks),
                           abort=lambda: self._free_new(chunks))

    # ---- scheduling hooks --------------------------------------------------------------------------

    def update_queue(self, upcoming: Sequence[Hashable], **windows) -> list[EntryKey]:
        """Tell the policy the sessions of the queued jobs (soonest first; ``windows``: the policy's
        look-ahead windows), drop what it says has expired, then `prefetch`; returns the keys started."""
        with self._lock:
            self.policy.update_queue(upcoming, **windows)
            now = time.time()
            for key in self.policy.expired([k for k, e in self._entries.items() if not e.busy()], now):
                if (e := self._entries.get(key)) is not None and not e.busy():
                    self._remove_locked(key, e, evicted_from="disk" if e.disk_nbytes else "dram")
        return self.prefetch()

    def job_started(self, key: EntryKey) -> None:
        """Tell the policy that ``key``'s job left the queue and started."""
        with self._lock:
            self.policy.start(key, time.time())

    def prefetch(self) -> list[EntryKey]:
        """Start reading the policy's `prefetch` choices from disk into DRAM in the background, without
        evicting anything or crossing the high watermark; returns the keys started."""
        if self._disk is None:
            return []
        with self._lock:
            on_disk = [k for k, e in self._entries.items()
                       if e.reading is None and any(c.offset is None for c, _, _ in e.views)]
            allowed = set(on_disk)
            chosen = [k for k in self.policy.prefetch(on_disk) if k in allowed]
            for k in chosen:
                self._submit_locked(self._prefetch_one, k)
            return chosen

    def sync(self) -> None:
        """Wait until background demotions and prefetches have finished."""
        while True:
            with self._lock:
                tasks = list(self._tasks)
            if not tasks:
                return
            for t in tasks:
                t.exception()

    def flush(self) -> list[EntryKey]:
        """Write every entry's current history to the lower tier (what a restart will find); returns the
        sessions it could not write (no room, or a write error: see ``stats()["disk"]["write_errors"]``)."""
        failed = []
        if self._disk is None:
            return failed
        with self._lock:
            for key, e in list(self._entries.items()):
                while e.io or e.reading is not None:
                    self._cond.wait()
                if self._entries.get(key) is e and not self._persist_locked(key, e):
                    log.warning("could not write session %r to the lower tier", key.session)
                    failed.append(key)
        return failed

    def close(self, persist: bool = True) -> None:
        """Finish background work, `flush` if ``persist``, release the lower tier. The store is unusable after.

        A session `flush` cannot write is dropped from the lower tier too (counted in ``dropped``), so
        that the next process never finds an older history of it after a clean shutdown."""
        self.sync()
        if persist:
            failed = self.flush()
            with self._lock:
                for key in failed:
                    if (e := self._entries.get(key)) is not None:
                        self._remove_locked(key, e, evicted_from="dram")
        self._executor.shutdown(wait=True)
        if self._disk is not None:
            self._disk.close()

    # ---- internals: saves, views, chunk lifetime -------------------------------------------------------

    def _check_start_locked(self, key: EntryKey, layout: KVLayout, start: int) -> _Entry | None:
        e = self._entries.get(key)
        have = 0 if e is None else e.num_tokens
        if start > have:
            raise ValueError(f"start={start} but only {have} tokens of session {key.session!r} are stored")
        if e is not None and start > 0 and e.layout != layout:
            raise ValueError(f"layout {layout} differs from the stored {e.layout} of session {key.session!r}")
        return e

    def _commit(self, key: EntryKey, layout: KVLayout, start: int, chunks: list[_Chunk]) -> None:
        with self._lock:
            try:
                e = self._check_start_locked(key, layout, start)
            except ValueError:
                self._free_new_locked(chunks)
                raise
            if e is None:
                e = self._entries[key] = _Entry(layout, ff.new_id(), time.time_ns())
            e.layout = layout  # a change only if start == 0, and then every old chunk retires below
            e.views = _cut(e.views, 0, start) + [(c, 0, c.num_tokens) for c in chunks]
            e.chunks.update((c.id, c) for c in chunks)
            self._retire_dead_locked(e)
            e.version += 1
            self._counters["dram"]["bytes_in"] += layout.payload_nbytes(sum(c.num_tokens for c in chunks))
            self.policy.touch(key, time.time())
            if self._pool.used > self._high and not self._demoting:
                self._demoting = True
                self._submit_locked(self._demote_to_low_watermark)

    def _retire_dead_locked(self, e: _Entry) -> None:
        """Chunks no view names any more: free their DRAM (unless pinned); forget them once no file is left
        (a file a committed manifest names goes at the next manifest)."""
        live = {id(c) for c, _, _ in e.views}
        for c in list(e.chunks.values()):
            if id(c) in live:
                continue
            c.live = False
            if c.offset is not None and c.pins == 0:
                self._pool.free(c.offset, c.extent_nbytes)
                c.offset = None
            if c.offset is None and c.file_nbytes == 0:
                del e.chunks[c.id]

    def _unpin(self, chunks: Iterable[_Chunk]) -> None:
        with self._lock:
            self._unpin_locked(chunks)

    def _free_new(self, chunks: list[_Chunk]) -> None:
        with self._lock:
            self._free_new_locked(chunks)

    def _free_new_locked(self, chunks: list[_Chunk]) -> None:
        for c in chunks:
            self._pool.free(c.offset, c.extent_nbytes)
            c.offset = None
        self._cond.notify_all()

    def _record_transfer(self, hidden_s: float, exposed_s: float, nbytes: int) -> None:
        with self._lock:
            t = self._counters["transfer"]
            t["loads"] += 1
            t["bytes"] += nbytes
            t["load_s_hidden"] += hidden_s
            t["load_s_exposed"] += exposed_s

    def _count_miss(self) -> None:
        self._counters["dram"]["misses"] += 1
        if self._disk is not None:
            self._counters["disk"]["misses"] += 1

    def _submit_locked(self, fn, *args) -> None:
        def run():  # its `finally` waits for the lock the submitter holds, so `future` is bound by then
            try:
                fn(*args)
            except Exception:  # a background failure must not vanish silently
                log.exception("store background task failed")
            finally:
                with self._lock:
                    self._tasks.discard(future)
                    self._cond.notify_all()
        future = self._executor.submit(run)
        self._tasks.add(future)

    @contextmanager
    def _unlocked(self):
        self._lock.release()
        try:
            yield
        finally:
            self._lock.acquire()

    # ---- internals: room in the pool ---------------------------------------------------------------

    def _allocate_tokens_locked(self, layout: KVLayout, m: int) -> list[tuple[int, int]]:
        """``(offset, num_tokens)`` extents for ``m`` tokens: a save may span several chunks, so free space
        split by other chunks is used as it is, and only a pool short of space evicts."""
        tnb, deadline = layout.token_nbytes, time.monotonic() + self._full_timeout_s
        while sum(s // tnb for s in self._pool.free_extent_sizes()) < m:
            self._make_room_locked(layout.payload_nbytes(m), None, deadline)
        pieces, left = [], m
        while left:
            n = min(left, self._pool.largest_free() // tnb)
            pieces.append((self._pool.allocate(layout.extent_nbytes(n)), n))
            left -= n
        return pieces

    def _allocate_locked(self, nbytes: int, evict: bool, mine: _Entry) -> int | None:
        deadline = time.monotonic() + self._full_timeout_s
        while (offset := self._pool.allocate(nbytes)) is None:
            if not evict:
                return None
            self._make_room_locked(nbytes, mine, deadline)
        return offset

    def _make_room_locked(self, nbytes: int, mine: _Entry | None, deadline: float) -> None:
        """Evict one victim, or wait a while for another thread's lease or I/O to end; StoreFullError if
        neither helps by ``deadline``."""
        if self._evict_dram_locked():
            return
        left = deadline - time.monotonic()
        if left > 0 and (self._demoting or any(e.busy() for e in self._entries.values() if e is not mine)):
            self._cond.wait(timeout=min(left, 0.5))
            return
        raise StoreFullError(f"host pool full: {nbytes} bytes needed, {self._pool.capacity - self._pool.used} of "
                             f"{self._pool.capacity} free, and every stored session is pinned or in use")

    def _evict_dram_locked(self) -> bool:
        """Move the policy's DRAM victim out of the pool: to the lower tier, or dropped if it cannot go
        there. False if no session may leave."""
        cands = [k for k, e in self._entries.items()
                 if not e.busy() and any(c.offset is not None for c in e.chunks.values())]
        key = self.policy.victim("dram", cands) if cands else None
        if key is None or key not in set(cands):
            return False
        e = self._entries[key]
        if self._disk is None or not self._persist_locked(key, e):
            if self._entries.get(key) is e:
                self._remove_locked(key, e, evicted_from="dram")
            return True
        # Free every chunk now on disk; tokens the session gained meanwhile stay for the next round.
        freed = 0
        for c in e.chunks.values():
            if c.offset is not None and c.file_nbytes and c.pins == 0:
                self._pool.free(c.offset, c.extent_nbytes)
                c.offset = None
                freed += e.layout.payload_nbytes(c.num_tokens)
        if freed:
            self._counters["dram"]["evictions"] += 1
            self._counters["dram"]["bytes_out"] += freed
            self._cond.notify_all()
        return True

    def _demote_to_low_watermark(self) -> None:
        with self._lock:
            try:
                while self._pool.used > self._low and self._evict_dram_locked():
                    pass
            finally:
                self._demoting = False
                self._cond.notify_all()

    # ---- internals: moving chunks between tiers ---------------------------------------------------------

    def _persist_locked(self, key: EntryKey, e: _Entry) -> bool:
        """Write ``e``'s current history to the lower tier: the chunk files it lacks, then the manifest,
        then remove the files only the previous manifest named. False if the tier cannot take it."""
        if e.manifest is not None and e.manifest[0] == e.version:
            return True
        version, layout, views = e.version, e.layout, list(e.views)
        live = list({id(c): c for c, _, _ in views}.values())
        to_write = [c for c in live if c.file_nbytes == 0]
        sizes = {c.id: self._disk.chunk_nbytes(key, layout, c.id, c.num_tokens) for c in to_write}
        data = ff.pack_manifest(key, layout, e.incarnation, e.created_ns, version,
                                [(c.id, c.num_tokens, c.file_nbytes or sizes[c.id]) for c in live],
                                [(c.id, lo, hi) for c, lo, hi in views])
        garbage = [c for c in e.chunks.values() if not c.live and c.file_nbytes]
        need = sum(sizes.values()) + len(data)
        if need > self._disk.capacity:
            return False
        e.io += 1
        try:
            while self._disk_used + need > self._disk.capacity:
                if not self._evict_disk_locked():
                    return False
            if e.removed:
                return False
            self._disk_used += need
            for c in to_write:
                c.pins += 1
            written, committed, error = [], False, None
            try:
                with self._unlocked(), e.io_lock:
                    try:
                        for c in to_write:
                            if e.removed:
                                break
                            payload = self._pool.view(c.offset, layout.payload_nbytes(c.num_tokens))
                            written.append((c, self._disk.write_chunk(key, layout, c.id, c.token_ids, payload)))
                        if not e.removed and len(written) == len(to_write):
                            self._disk.write_manifest(key, e.incarnation, data)
                            committed = True
                            self._disk.remove(key, e.incarnation, [c.id for c in garbage], manifest=False)
                    except OSError as exc:
                        error = exc
                    if e.removed:  # a delete or a drop came first: leave nothing behind
                        self._disk.remove(key, e.incarnation, [c.id for c, _ in written], manifest=committed)
            finally:
                self._disk_used -= need
                self._unpin_locked(to_write)
            if error is not None:
                self._counters["disk"]["write_errors"] += 1
                log.warning("writing session %r to the lower tier failed: %s", key.session, error)
            if e.removed:
                return False
            for c, nbytes in written:
                c.file_nbytes = nbytes
                self._disk_used += nbytes
            self._counters["disk"]["bytes_in"] += sum(layout.payload_nbytes(c.num_tokens) for c, _ in written)
            if not committed:
                return False
            self._disk_used += len(data) - (e.manifest[1] if e.manifest else 0)
            e.manifest = (version, len(data))
            for c in garbage:
                self._disk_used -= c.file_nbytes
                c.file_nbytes = 0
                if c.offset is None:
                    e.chunks.pop(c.id, None)
            return True
        finally:
            e.io -= 1
            self._cond.notify_all()

    def _ensure_ids_locked(self, key: EntryKey, e: _Entry) -> bool:
        """Read token ids a restart left on disk only (chunk headers, no payload); False if unusable."""
        missing = [c for c, _, _ in e.views if c.token_ids is None]
        if not missing:
            return True
        e.io += 1
        try:
            with self._unlocked(), e.io_lock:
                ids = [self._disk.read_chunk(key, e.layout, c.id, c.num_tokens) for c in missing]
        except (ff.FormatError, OSError) as exc:
            return self._corrupt_locked(key, e, exc)
        finally:
            e.io -= 1
            self._cond.notify_all()
        for c, t in zip(missing, ids):
            c.token_ids = t
        return not e.removed

    def _ensure_dram_locked(self, key: EntryKey, e: _Entry, views: list, evict: bool) -> bool:
        """Read the chunks of ``views`` (of ``e``) that are only on disk into the pool, checksummed; False
        on a miss (corrupt or removed; or, without ``evict``, no free room)."""
        while e.reading is not None:  # another thread is reading chunks of it: wait for it
            ev = e.reading
            with self._unlocked():
                ev.wait()
        missing = [c for c in {id(c): c for c, _, _ in views}.values() if c.offset is None and c.live]
        if e.removed or not missing:
            return not e.removed
        need = sum(c.extent_nbytes for c in {id(c): c for c, _, _ in views}.values())
        if need > self._pool.capacity:
            log.warning("session %r needs %d bytes of DRAM to be loaded, more than the DRAM tier's %d: a miss",
                        key.session, need, self._pool.capacity)
            return False
        ev = e.reading = threading.Event()
        e.io += 1
        got, attached = [], False
        try:
            for attempt in range(2):
                try:
                    for c in missing:
                        offset = self._allocate_locked(c.extent_nbytes, evict, mine=e)
                        if offset is None or e.removed:
                            return False
                        got.append((c, offset))
                    break
                except StoreFullError:
                    for c, offset in got:
                        self._pool.free(offset, c.extent_nbytes)
                    got.clear()
                    if attempt or not self._unfragment_locked(key, e):
                        raise
                    missing = [c for c in {id(c): c for c, _, _ in views}.values() if c.offset is None and c.live]
            with self._unlocked(), e.io_lock:
                ids = [self._disk.read_chunk(key, e.layout, c.id, c.num_tokens,
                                             self._pool.view(offset, c.extent_nbytes)) for c, offset in got]
            if e.removed:
                return False
            for (c, offset), t in zip(got, ids):
                if c.live:  # a truncate meanwhile may have retired it
                    c.offset, c.token_ids = offset, t
                else:
                    self._pool.free(offset, c.extent_nbytes)
            attached = True
            nbytes = e.layout.payload_nbytes(sum(c.num_tokens for c in missing))
            self._counters["dram"]["bytes_in"] += nbytes
            self._counters["disk"]["bytes_out"] += nbytes
            return True
        except (ff.FormatError, OSError) as exc:
            return self._corrupt_locked(key, e, exc)
        finally:
            if not attached:
                for c, offset in got:
                    self._pool.free(offset, c.extent_nbytes)
            e.io -= 1
            e.reading = None
            ev.set()
            self._cond.notify_all()

    def _unfragment_locked(self, key: EntryKey, e: _Entry) -> bool:
        """The pool has room for ``e`` but not in the pieces its chunks need, and nothing else may leave:
        write ``e``'s DRAM-only chunks to disk and free all its chunks, so that they come back together.
        False if nothing could be freed."""
        if self._disk is None or not self._persist_locked(key, e) or e.removed:
            return False
        freed = False
        for c in e.chunks.values():
            if c.offset is not None and c.file_nbytes and c.pins == 0:
                self._pool.free(c.offset, c.extent_nbytes)
                c.offset, freed = None, True
        return freed

    def _prefetch_one(self, key: EntryKey) -> None:
        with self._lock:
            e = self._entries.get(key)
            if e is None or e.busy():
                return
            need = sum(c.extent_nbytes for c in {id(c): c for c, _, _ in e.views}.values() if c.offset is None)
            if need and self._pool.used + need <= self._high and self._ensure_dram_locked(key, e, e.views, False):
                self._counters["disk"]["prefetched"] += 1

    def _corrupt_locked(self, key: EntryKey, e: _Entry, exc: Exception) -> bool:
        if not e.removed:  # else the files went with a delete that came first: not corruption
            log.warning("session %r: stored KV unusable (%s); dropped", key.session, exc)
            self._counters["disk"]["corrupt"] += 1
            self._remove_locked(key, e)
        return False

    def _evict_disk_locked(self) -> bool:
        """Drop the policy's disk victim from every tier; False if no session may leave."""
        cands = [k for k, e in self._entries.items() if not e.busy() and e.disk_nbytes > 0]
        key = self.policy.victim("disk", cands) if cands else None
        if key is None or key not in set(cands):
            return False
        self._remove_locked(key, self._entries[key], evicted_from="disk")
        return True

    def _remove_locked(self, key: EntryKey, e: _Entry, evicted_from: str | None = None) -> None:
        """Take ``e`` out of the index, free its DRAM (pinned chunks at unpin), remove its files."""
        del self._entries[key]
        e.removed = True
        self.policy.forget(key)
        if evicted_from is not None:
            self._counters[evicted_from]["evictions"] += 1
        if evicted_from == "dram":  # out of DRAM with nowhere to go
            self._counters["dram"]["dropped"] += 1
        for c in e.chunks.values():
            c.live = False
            if c.offset is not None and c.pins == 0:
                self._pool.free(c.offset, c.extent_nbytes)
                c.offset = None
        if self._disk is not None:
            try:
                with self._unlocked(), e.io_lock:  # waits for this entry's writes or reads in flight
                    self._disk.remove(key, e.incarnation, list(e.chunks), manifest=True)
            except OSError as exc:
                log.warning("removing session %r from the lower tier failed: %s", key.session, exc)
            self._disk_used -= e.disk_nbytes
            for c in e.chunks.values():
                c.file_nbytes = 0
            e.manifest = None
        self._cond.notify_all()

    def _unpin_locked(self, chunks: Iterable[_Chunk]) -> None:
        for c in chunks:
            c.pins -= 1
            if c.pins == 0 and not c.live and c.offset is not None:
                self._pool.free(c.offset, c.extent_nbytes)
                c.offset = None
        self._cond.notify_all()
