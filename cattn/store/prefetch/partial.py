"""Partial prefetch: a history read from disk oldest first, one chunk at a time, so that a job starting
while its prefetch is still being read uses the part already in DRAM and reads on or prefills the rest.

The simulator's `TierModel.partial_prefetch` says a read is worth the part of it that arrives in time.
With `TieredStore(partial_prefetch=True)` the prefetch lane reads a session's missing chunks in token
order, each whole (all layers, checksummed: a chunk is the smallest piece whose bytes the disk format
vouches for) and in the pool before the next begins. When the session's job starts mid-read
(`TieredStore.job_started`), the read stops after the chunk in flight and the entry is marked
``prefetch_stopped`` (the lane does not read it again before its next save or job): the job's own
load takes the longest prefix in DRAM (`TieredStore.tokens_in_dram`) and streams the rest layer by
layer from disk (`cattn.store.tiered.layerwise`), as much as the disk delivers while the GPU prefills the
remainder (`ChatSession`'s split: `BufferRule.disk_tokens`). Nothing about the stored entry changes:
its views, chunks and files stay the whole history.
"""
from __future__ import annotations

from cattn.store.contract import EntryKey
from cattn.store.tiered.entries import Entry, View, chunks_of
from cattn.store.tiered.migration import promote_locked
from cattn.store.tiered.state import StoreState


def dram_prefix(views: list[View]) -> list[View]:
    """The leading ``views`` whose chunks are in the pool: the oldest tokens, up to the first one on disk only."""
    out = []
    for view in views:
        if view[0].offset is None:
            break
        out.append(view)
    return out


def read_oldest_first_locked(st: StoreState, key: EntryKey, e: Entry) -> int:
    """Read ``e``'s chunks that are on disk only into the pool, oldest tokens first, one chunk at a time,
    until all are in or its job started (``e.prefetch_stopped``, checked between chunks); no room is made
    here (`migration.prefetch_one` made it). Returns the extent bytes read (0: nothing)."""
    done = 0
    e.io += 1   # between chunks the entry must not look idle: a demotion would undo the read
    try:
        while not e.removed and st.entries.get(key) is e:
            c = next((c for c in chunks_of(e.views) if c.offset is None), None)
            if c is None:
                break
            if e.prefetch_stopped:
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
