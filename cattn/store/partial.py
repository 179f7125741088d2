"""Partial prefetch: a history read from disk oldest first, one chunk at a time, so that a job starting
while its prefetch is still being read uses the part already in DRAM and prefills the rest.

The simulator's `TierModel.partial_prefetch` says a read is worth the part of it that arrives in time.
With `TieredStore(partial_prefetch=True)` the prefetch lane reads a session's missing chunks in token
order, each whole (all layers, checksummed: a chunk is the smallest piece whose bytes the disk format
vouches for) and in the pool before the next begins. When the session's job starts mid-read
(`TieredStore.job_started`), the read stops after the chunk in flight and the entry is marked
``dram_prefix_only``: `lookup` and a load of the whole history serve its longest prefix in DRAM, and the
caller prefills the rest. Nothing about the stored entry changes: its views, chunks and files stay the
whole history, so a save from any ``start``, a truncation, a demotion or a restart sees it exactly as
before, and a load of an explicit token count still reads whatever of it is on disk.
"""
from __future__ import annotations

from cattn.store.base import EntryKey
from cattn.store.entries import Entry, View, chunks_of
from cattn.store.migration import promote_locked
from cattn.store.state import StoreState


def dram_prefix(views: list[View]) -> list[View]:
    """The leading ``views`` whose chunks are in the pool: the oldest tokens, up to the first one on disk only."""
    out = []
    for view in views:
        if view[0].offset is None:
            break
        out.append(view)
    return out


def servable_tokens(e: Entry) -> int:
    """What a lookup shows and a load of the whole history serves: every token, or, while its stopped
    prefetch left only a prefix in DRAM, that prefix."""
    views = dram_prefix(e.views) if e.dram_prefix_only else e.views
    return sum(hi - lo for _, lo, hi in views)


def read_oldest_first_locked(st: StoreState, key: EntryKey, e: Entry) -> int:
    """Read ``e``'s chunks that are on disk only into the pool, oldest tokens first, one chunk at a time,
    until all are in or its job started (``e.dram_prefix_only``, checked between chunks); no room is made
    here (`migration.prefetch_one` made it). Returns the extent bytes read (0: nothing)."""
    done = 0
    e.io += 1   # between chunks the entry must not look idle: a demotion would undo the read
    try:
        while not e.removed and st.entries.get(key) is e:
            c = next((c for c in chunks_of(e.views) if c.offset is None), None)
            if c is None:
                break
            if e.dram_prefix_only:
                st.counters["disk"]["prefetch_stopped"] += 1
                break
            if not promote_locked(st, key, e, [(c, 0, c.num_tokens)], evict=False):
                break
            if c.offset is not None:
                done += c.extent_nbytes
    finally:
        e.io -= 1
        st.cond.notify_all()
    return done
