"""Layer-wise reads from disk: a lease whose chunks on disk only arrive one layer at a time, so that
the GPU computes layer ``l`` while the disk reads layer ``l + 1``.

A history on disk only is worth what the disk delivers while the prefill runs: with
``TieredStore.acquire(key, n, layerwise=True)`` the pool extents of the missing chunks are
allocated at once and a reader thread fills them layer by layer (``k[l]`` and ``v[l]`` of every
missing chunk, then layer ``l + 1``), each layer checked against its own checksum in the chunk
file's header (`fileformat.ChunkLayers`). The lease's `wait_layer(l)`, which `LayerLoader` calls
before copying layer ``l`` to the GPU, blocks until that layer is in. When the read ends, the chunks
join the DRAM tier as a whole read would leave them.

A layer that does not check out is corruption: the session is dropped from the store (never
served again) and `wait_layer` raises `HistoryLost`, in the middle of the forward that was using
it. The caller then redoes the turn without the history (`ChatSession` does). Chunks that only
the shared tier holds, or files written before per-layer checksums, are read whole first (the
lease then streams from DRAM as any other).
"""
from __future__ import annotations

import threading

import torch

from cattn.store.errors import FormatError, HistoryLost, StoreFullError
from cattn.store.lower import fileformat as ff
from cattn.store.contract import EntryKey
from cattn.store.tiered.entries import Chunk, Entry, View, chunks_of, segments_of
from cattn.store.lease import KVLease
from cattn.store.tiered.migration import allocate_locked, end_read_locked, free_extents_locked
from cattn.store.tiered.state import StoreState


class _Progress:
    """How many layers the reader has finished, or why it stopped."""

    def __init__(self):
        self.cond, self.layers, self.error = threading.Condition(), 0, None

    def arrived(self, layers: int) -> None:
        with self.cond:
            self.layers = layers
            self.cond.notify_all()

    def failed(self, error: BaseException) -> None:
        with self.cond:
            self.error = error
            self.cond.notify_all()

    def wait(self, layer: int) -> None:
        with self.cond:
            while self.layers <= layer and self.error is None:
                self.cond.wait()
            if self.layers <= layer:
                raise HistoryLost(f"the stored history could not be read: {self.error}") from self.error


class LayerwiseLease(KVLease):
    """A `KVLease` whose segments over chunks being read from disk fill one layer at a time."""

    streamed = True

    def __init__(self, *args, progress: _Progress, **kwargs):
        super().__init__(*args, **kwargs)
        self._progress = progress

    def wait_layer(self, layer: int) -> None:
        self._progress.wait(layer)


def acquire_layerwise_locked(st: StoreState, key: EntryKey, e: Entry, views: list[View], on_release,
                             on_transfer) -> KVLease | None:
    """A `LayerwiseLease` over ``views`` (of ``e``), or None where a layer-wise read is not set up (no
    chunk on disk only, no room, a chunk the disk cannot read per layer, the history changed or proved
    corrupt meanwhile): the caller then reads whole, or finds the miss. ``on_release(held)`` (under the
    store's lock: `release_locked`) and ``on_transfer`` are the store's callbacks."""
    if st.disk is None or not st.disk.reads_layers or e.reading is not None:
        return None
    missing = [c for c in chunks_of(views) if c.offset is None and c.live]
    if not missing:
        return None
    ev = e.reading = threading.Event()   # no other read of it meanwhile; busy: not a victim for the room
    e.io += 1
    got: list[tuple[Chunk, int]] = []
    try:
        for c in missing:
            got.append((c, allocate_locked(st, c.extent_nbytes, evict=True, mine=e)))
    except StoreFullError:
        end_read_locked(st, e, ev, got)
        return None                      # the whole read says so, the same way
    if e.removed or any(not c.live or c.offset is not None for c in missing):   # it changed while room was made
        end_read_locked(st, e, ev, got)
        return None
    readers: list[ff.ChunkLayers] = []
    try:
        with st.unlocked():
            for c in missing:
                if (r := st.disk.open_layers(key, e.layout, c.id, c.num_tokens)) is None:
                    break
                readers.append(r)
    except (FormatError, OSError) as exc:
        _close(readers)
        end_read_locked(st, e, ev, got)
        st.corrupt_locked(key, e, exc)
        return None
    if len(readers) < len(missing) or e.removed:
        _close(readers)
        end_read_locked(st, e, ev, got)
        return None
    ids = {id(c): r.token_ids for c, r in zip(missing, readers)}
    segments = segments_of(views, e.layout, st.pool, {id(c): off for c, off in got})
    pinned = [c for c in chunks_of(views) if id(c) not in ids]   # in DRAM already
    for c in pinned:
        c.pins += 1
    token_ids = torch.cat([(ids[id(c)] if id(c) in ids else c.token_ids)[lo:hi] for c, lo, hi in views])
    progress, held = _Progress(), _Held(pinned)
    lease = LayerwiseLease(token_ids, segments, e.layout, on_release=lambda: on_release(held),
                           on_transfer=on_transfer, source="disk", progress=progress)
    st.counters["disk"]["layerwise_reads"] += 1
    reader = threading.Thread(target=_read, args=(st, key, e, ev, got, readers, progress, held), daemon=True,
                              name=f"cattn-layerwise-{key.session}")
    st.layer_reads.add(reader)       # `TieredStore.sync` (and so `close`) waits for it
    reader.start()
    return lease


class _Held:
    """What a layer-wise lease holds in the pool: chunks it pinned, and extents no chunk owns (the read's,
    until it attaches them; for good if it failed or the history moved on): freed at release."""

    def __init__(self, pinned: list[Chunk]):
        self.pinned, self.extents, self.released = pinned, [], False


def release_locked(st: StoreState, held: _Held) -> None:
    """The lease is done with its views: unpin its chunks, free the extents it alone holds."""
    held.released = True
    st.unpin_locked(held.pinned)
    held.pinned = []   # the read, if it is still going, unpins what it attaches after this
    free_extents_locked(st, held.extents)


def _read(st: StoreState, key: EntryKey, e: Entry, ev: threading.Event, got: list[tuple[Chunk, int]],
          readers: list[ff.ChunkLayers], progress: _Progress, held: _Held) -> None:
    error = None
    try:
        with e.io_lock:
            for layer in range(e.layout.num_layers):
                for (c, offset), r in zip(got, readers):
                    r.read_layer(layer, st.pool.view(offset, c.extent_nbytes))
                progress.arrived(layer + 1)
    except Exception as exc:   # noqa: BLE001 - corrupt, unreadable or anything else: never served, never hung
        error = exc
    finally:
        _close(readers)
    with st.lock:
        for (c, offset), r in zip(got, readers):
            if error is None and c.live and not e.removed and c.offset is None:
                c.offset, c.token_ids = offset, r.token_ids   # in DRAM now, as a whole read leaves it
                c.pins += 1
                held.pinned.append(c)
            else:
                held.extents.append((c, offset))
        got.clear()
        if held.released:   # the lease went before the read ended (a failed forward): let go now
            st.unpin_locked(held.pinned)
            free_extents_locked(st, held.extents)
            held.pinned = []
        if error is None:
            moved = sum(e.layout.payload_nbytes(r.token_ids.numel()) for r in readers)
            st.counters["dram"]["bytes_in"] += moved
            st.counters["disk"]["bytes_out"] += moved
        st.layer_reads.discard(threading.current_thread())
        end_read_locked(st, e, ev, [])
        if error is not None:
            st.corrupt_locked(key, e, error)
    if error is not None:
        progress.failed(error)


def _close(readers: list[ff.ChunkLayers]) -> None:
    for r in readers:
        r.close()
