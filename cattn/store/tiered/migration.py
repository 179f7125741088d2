"""Moving chunks between the DRAM pool and the lower tier: room in the pool, demotion, promotion, drops.

Past the high watermark a background thread demotes the policy's DRAM victims
to the lower tier until the low watermark (`demote_to_low_watermark`); an
allocation that finds the pool full demotes in its own thread. A DRAM victim
the lower tier cannot take is dropped; when the lower tier is full, the
policy's disk victims are dropped from every tier. Promotion reads chunk files
straight into pool extents, checksummed. Every function takes the store's
`StoreState`; those named ``*_locked`` expect its lock held and release it
during file I/O and while waiting for room.
"""
from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from cattn.store.errors import FormatError, StoreFullError
from cattn.store.lower import fileformat as ff
from cattn.store.contract import EntryKey
from cattn.store.tiered.entries import Chunk, Entry, View, chunks_of
from cattn.store.layout import KVLayout
from cattn.store.tiered.state import StoreState

log = logging.getLogger(__name__)


# ---- room in the pool ------------------------------------------------------------------------------

def allocate_tokens_locked(st: StoreState, layout: KVLayout, m: int) -> list[tuple[int, int]]:
    """``(offset, num_tokens)`` extents for ``m`` tokens: a save may span several chunks, so free space
    split by other chunks is used as it is, and only a pool short of space evicts; none holds more than
    ``st.max_chunk_tokens`` (the pieces a partial prefetch can stop between)."""
    tnb, deadline = layout.token_nbytes, time.monotonic() + st.full_timeout_s
    while sum(s // tnb for s in st.pool.free_extent_sizes()) < m:
        _make_room_locked(st, layout.payload_nbytes(m), None, deadline)
    pieces, left = [], m
    while left:
        n = min(left, st.pool.largest_free() // tnb, st.max_chunk_tokens or left)
        pieces.append((st.pool.allocate(layout.extent_nbytes(n)), n))
        left -= n
    return pieces


def allocate_locked(st: StoreState, nbytes: int, evict: bool, mine: Entry) -> int | None:
    """An extent of ``nbytes`` for a chunk of ``mine``; None if the pool has no room and ``evict`` is off."""
    deadline = time.monotonic() + st.full_timeout_s
    while (offset := st.pool.allocate(nbytes)) is None:
        if not evict:
            return None
        _make_room_locked(st, nbytes, mine, deadline)
    return offset


def _make_room_locked(st: StoreState, nbytes: int, mine: Entry | None, deadline: float) -> None:
    """Evict one victim, or wait a while for another thread's lease or I/O to end; StoreFullError if
    neither helps by ``deadline``."""
    if evict_dram_locked(st):
        return
    left = deadline - time.monotonic()
    if left > 0 and (st.demoting or any(e.busy() for e in st.entries.values() if e is not mine)):
        st.cond.wait(timeout=min(left, 0.5))
        return
    raise StoreFullError(f"host pool full: {nbytes} bytes needed, {st.pool.capacity - st.pool.used} of "
                         f"{st.pool.capacity} free, and every stored session is pinned or in use")


# ---- leaving a tier --------------------------------------------------------------------------------

def _victim_locked(st: StoreState, tier: str, holds: Callable[[Entry], bool],
                   incoming: EntryKey | None = None) -> EntryKey | None:
    """The policy's choice among the sessions that hold bytes in ``tier`` and may leave it, if any
    (with ``incoming``: only one the policy values less than that session)."""
    cands = [k for k, e in st.entries.items() if not e.busy() and holds(e) and k != incoming]
    key = st.policy.victim(tier, cands, incoming=incoming) if cands else None
    return key if key in cands else None


def evict_dram_locked(st: StoreState, incoming: EntryKey | None = None) -> bool:
    """Move the policy's DRAM victim out of the pool: to the lower tier, or dropped if it cannot go
    there. False if no session may leave (for ``incoming``: none the policy values less)."""
    key = _victim_locked(st, "dram", lambda e: any(c.offset is not None for c in e.chunks.values()), incoming)
    if key is None:
        return False
    e = st.entries[key]
    if st.disk is None or not persist_locked(st, key, e):
        if st.entries.get(key) is e:
            st.remove_locked(key, e, evicted_from="dram")
        return True
    # Free every chunk now on disk; tokens the session gained meanwhile stay for the next round.
    if freed := free_persisted_locked(st, e):
        st.counters["dram"]["evictions"] += 1
        st.counters["dram"]["bytes_out"] += freed
        st.cond.notify_all()
    return True


def free_persisted_locked(st: StoreState, e: Entry) -> int:
    """Free the DRAM of ``e``'s unpinned chunks that are also on disk; returns the payload bytes freed."""
    freed = 0
    for c in e.chunks.values():
        if c.offset is not None and c.file_nbytes and c.pins == 0:
            st.free_dram_locked(c)
            freed += e.layout.payload_nbytes(c.num_tokens)
    return freed


def demote_to_low_watermark(st: StoreState) -> None:
    """The background demotion a save past the high watermark starts (with ``st.demoting`` set)."""
    with st.lock:
        try:
            while st.pool.used > st.low_bytes and evict_dram_locked(st):
                pass
        finally:
            st.demoting = False
            st.cond.notify_all()


def _evict_disk_locked(st: StoreState) -> bool:
    """Drop the policy's disk victim from every tier; False if no session may leave."""
    key = _victim_locked(st, "disk", lambda e: e.disk_nbytes > 0)
    if key is None:
        return False
    st.remove_locked(key, st.entries[key], evicted_from="disk")
    return True


# ---- writing to the lower tier ---------------------------------------------------------------------

def persist_locked(st: StoreState, key: EntryKey, e: Entry) -> bool:
    """Write ``e``'s current history to the lower tier: the chunk files it lacks, then the manifest,
    then remove the files only the previous manifest named. False if the tier cannot take it."""
    if e.manifest is not None and e.manifest[0] == e.version:
        return True
    version, layout, views = e.version, e.layout, list(e.views)
    live = chunks_of(views)
    to_write = [c for c in live if c.file_nbytes == 0]
    sizes = {c.id: st.disk.chunk_nbytes(key, layout, c.id, c.num_tokens) for c in to_write}
    data = ff.pack_manifest(key, layout, e.incarnation, e.created_ns, version,
                            [(c.id, c.num_tokens, c.file_nbytes or sizes[c.id]) for c in live],
                            [(c.id, lo, hi) for c, lo, hi in views])
    garbage = [c for c in e.chunks.values() if not c.live and c.file_nbytes]
    need = sum(sizes.values()) + len(data)
    if need > st.disk.capacity:
        return False
    e.io += 1
    # Pinned before room is made below: that releases the lock, and a truncate or a save meanwhile may
    # retire a chunk to write, which must not give its DRAM back before it is written.
    for c in to_write:
        c.pins += 1
    pinned = True
    try:
        while st.disk_used + need > st.disk.capacity:
            if not _evict_disk_locked(st):
                return False
        if e.removed:
            return False
        st.disk_used += need  # reserved while the lock is released
        written, committed, error = [], False, None
        try:
            with st.unlocked(), e.io_lock:
                try:
                    for c in to_write:
                        if e.removed:
                            break
                        payload = st.pool.view(c.offset, layout.payload_nbytes(c.num_tokens))
                        written.append((c, st.disk.write_chunk(key, layout, c.id, c.token_ids, payload)))
                    if not e.removed and len(written) == len(to_write):
                        st.disk.write_manifest(key, e.incarnation, data)
                        committed = True
                        st.disk.remove(key, e.incarnation, [c.id for c in garbage], manifest=False)
                except OSError as exc:
                    error = exc
                if e.removed:  # a delete or a drop came first: leave nothing behind
                    st.disk.remove(key, e.incarnation, [c.id for c, _ in written], manifest=committed)
        finally:
            st.disk_used -= need
            st.unpin_locked(to_write)
            pinned = False
        if error is not None:
            st.counters["disk"]["write_errors"] += 1
            log.warning("writing session %r to the lower tier failed: %s", key.session, error)
        if e.removed:
            return False
        for c, nbytes in written:
            c.file_nbytes = nbytes
            st.disk_used += nbytes
        st.counters["disk"]["bytes_in"] += sum(layout.payload_nbytes(c.num_tokens) for c, _ in written)
        if not committed:
            return False
        st.disk_used += len(data) - (e.manifest[1] if e.manifest else 0)
        e.manifest = (version, len(data))
        for c in garbage:
            st.disk_used -= c.file_nbytes
            c.file_nbytes = 0
            if c.offset is None:
                e.chunks.pop(c.id, None)
        return True
    finally:
        if pinned:
            st.unpin_locked(to_write)
        e.io -= 1
        st.cond.notify_all()


def publish(st: StoreState, key: EntryKey) -> None:
    """Write ``key``'s committed history through to the lower tier (a background task after each commit
    when the tier is shared), after any I/O of it in flight; a failure is counted and logged, and the
    session stays served from DRAM."""
    with st.lock:
        e = st.entries.get(key)
        while e is not None and (e.io or e.reading is not None):
            st.cond.wait()
        if e is not None and st.entries.get(key) is e and not persist_locked(st, key, e):
            log.info("session %r not written through to the shared tier", key.session)


# ---- reading from the lower tier -------------------------------------------------------------------

def read_ids_locked(st: StoreState, key: EntryKey, e: Entry) -> bool:
    """Read token ids a restart left on disk only (chunk headers, no payload); False if unusable."""
    missing = [c for c, _, _ in e.views if c.token_ids is None]
    if not missing:
        return True
    e.io += 1
    try:
        with st.unlocked(), e.io_lock:
            ids = [st.disk.read_chunk(key, e.layout, c.id, c.num_tokens) for c in missing]
    except (FormatError, OSError) as exc:
        return st.corrupt_locked(key, e, exc)
    finally:
        e.io -= 1
        st.cond.notify_all()
    for c, t in zip(missing, ids):
        c.token_ids = t
    return not e.removed


def promote_locked(st: StoreState, key: EntryKey, e: Entry, views: list[View], evict: bool) -> bool:
    """Read the chunks of ``views`` (of ``e``) that are only on disk into the pool, checksummed; False
    on a miss (corrupt or removed; or, without ``evict``, no free room)."""
    while e.reading is not None:  # another thread is reading chunks of it: wait for it
        ev = e.reading
        with st.unlocked():
            ev.wait()
    needed = chunks_of(views)
    missing = [c for c in needed if c.offset is None and c.live]
    if e.removed or not missing:
        return not e.removed
    if (need := sum(c.extent_nbytes for c in needed)) > st.pool.capacity:
        log.warning("session %r needs %d bytes of DRAM to be loaded, more than the DRAM tier's %d: a miss",
                    key.session, need, st.pool.capacity)
        return False
    ev = e.reading = threading.Event()
    e.io += 1
    got: list[tuple[Chunk, int]] = []   # extents allocated, not yet attached to their chunks
    try:
        for attempt in range(2):
            try:
                for c in missing:
                    if (offset := allocate_locked(st, c.extent_nbytes, evict, mine=e)) is None:
                        return False
                    got.append((c, offset))
                    if e.removed:
                        return False
                break
            except StoreFullError:
                free_extents_locked(st, got)
                if attempt or not _unfragment_locked(st, key, e):
                    raise
                missing = [c for c in needed if c.offset is None and c.live]
        with st.unlocked(), e.io_lock:
            ids = [st.disk.read_chunk(key, e.layout, c.id, c.num_tokens, st.pool.view(offset, c.extent_nbytes))
                   for c, offset in got]
        if e.removed:
            return False
        for (c, offset), t in zip(got, ids):
            if c.live:  # a truncate meanwhile may have retired it
                c.offset, c.token_ids = offset, t
            else:
                st.pool.free(offset, c.extent_nbytes)
        got.clear()
        nbytes = e.layout.payload_nbytes(sum(c.num_tokens for c in missing))
        st.counters["dram"]["bytes_in"] += nbytes
        st.counters["disk"]["bytes_out"] += nbytes
        return True
    except (FormatError, OSError) as exc:
        return st.corrupt_locked(key, e, exc)
    finally:
        end_read_locked(st, e, ev, got)


def end_read_locked(st: StoreState, e: Entry, ev: threading.Event, got: list[tuple[Chunk, int]]) -> None:
    """A read of ``e``'s chunks into the pool is over: free the extents it still holds (``got``), let the
    entry be a victim and be read again, wake whoever waits."""
    free_extents_locked(st, got)
    e.io -= 1
    e.reading = None
    ev.set()
    st.cond.notify_all()


def free_extents_locked(st: StoreState, got: list[tuple[Chunk, int]]) -> None:
    for c, offset in got:
        st.pool.free(offset, c.extent_nbytes)
    got.clear()


def _unfragment_locked(st: StoreState, key: EntryKey, e: Entry) -> bool:
    """The pool has room for ``e`` but not in the pieces its chunks need, and nothing else may leave:
    write ``e``'s DRAM-only chunks to disk and free all its chunks, so that they come back together.
    False if nothing could be freed."""
    if st.disk is None or not persist_locked(st, key, e) or e.removed:
        return False
    return free_persisted_locked(st, e) > 0


def prefetch_one(st: StoreState, key: EntryKey,
                 read_locked: Callable[[StoreState, EntryKey, Entry], int] | None = None) -> tuple[float, int] | None:
    """Read ``key``'s chunks into the pool below the high watermark, first demoting sessions the policy
    values less than ``key`` if that makes room (as the paper's scheduler does). ``read_locked(st, key, e)``
    reads them once room is made and returns the bytes it read (default: all at once); returns the
    seconds the read took and its bytes, or None if it did not happen."""
    with st.lock:
        e = st.entries.get(key)
        if e is None or e.busy():
            return None
        need = sum(c.extent_nbytes for c in chunks_of(e.views) if c.offset is None)
        while need and st.pool.used + need > st.high_bytes:
            used = st.pool.used
            if not evict_dram_locked(st, incoming=key) or st.pool.used >= used:
                return None  # nothing the policy values less, or nothing could be freed
            if st.entries.get(key) is not e or e.busy():  # changed while the victim was written
                return None
            need = sum(c.extent_nbytes for c in chunks_of(e.views) if c.offset is None)
        t0 = time.monotonic()
        if need and (nbytes := (read_locked or _read_all_locked)(st, key, e)):
            st.counters["disk"]["prefetched"] += 1
            return time.monotonic() - t0, nbytes
        return None


def _read_all_locked(st: StoreState, key: EntryKey, e: Entry) -> int:
    need = sum(c.extent_nbytes for c in chunks_of(e.views) if c.offset is None)
    return need if promote_locked(st, key, e, e.views, False) else 0
