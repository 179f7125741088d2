"""`TieredStore`'s save path: pool space reserved for a turn's new tokens (`begin_save`), filled by the
caller (the GPU copies each layer straight into it), and made part of the history at commit without
moving a byte; `save` is the same for KV already in host tensors.

`SavePath` is a part of `TieredStore`, apart only to keep each file about one thing: it uses the
store's ``_state`` (`StoreState`), ``device`` and ``_submit_locked``.
"""
from __future__ import annotations

import time

import torch

from cattn.store.contract import EntryKey, KVEntry, check_key
from cattn.store.errors import StoreFullError
from cattn.store.layout import KVLayout
from cattn.store.kvformat.segment import chunk_segment
from cattn.store.lease import PendingSave
from cattn.store.lower import fileformat as ff
from cattn.store.tiered.entries import Chunk, Entry, cut
from cattn.store.tiered.migration import allocate_tokens_locked, demote_to_low_watermark, publish


class SavePath:
    """`TieredStore`'s `save` and `begin_save` (see the module docstring)."""

    def save(self, key: EntryKey, entry: KVEntry, start: int = 0) -> None:
        check_key(key)
        pending = self.begin_save(key, entry.token_ids.cpu(), KVLayout.of(entry), start)
        try:
            pending.write(entry.k, entry.v)
        except BaseException:
            pending.abort()
            raise
        pending.commit()

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
        if not isinstance(layout, KVLayout):
            raise TypeError(f"layout must be a cattn.store.KVLayout, got {type(layout).__name__}")
        st, m = self._state, token_ids.numel()
        layout = layout.stored_as(st.kv_format)   # what the caller hands over, as this store keeps it
        if layout.extent_nbytes(m) > st.pool.capacity:
            raise StoreFullError(f"{layout.payload_nbytes(m)} bytes of KV exceed the DRAM tier's "
                                 f"{st.pool.capacity} bytes")
        with st.lock:
            pieces = allocate_tokens_locked(st, layout, m)
        chunks, segments, pos = [], [], 0
        for offset, n in pieces:
            chunks.append(Chunk(ff.new_id(), n, token_ids[pos:pos + n].clone(), offset, layout.extent_nbytes(n)))
            segments.append(chunk_segment(layout, st.pool.view(offset, layout.payload_nbytes(n)), n, pos))
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
            if st.disk is not None and st.disk.write_through:   # a shared tier: the next turn may run elsewhere
                self._submit_locked(publish, st, key)

    def _check_start_locked(self, key: EntryKey, layout: KVLayout, start: int) -> Entry | None:
        e = self._state.entries.get(key)
        have = 0 if e is None else e.num_tokens
        if start > have:
            raise ValueError(f"start={start} but only {have} tokens of session {key.session!r} are stored")
        if e is not None and start > 0 and e.layout != layout:
            raise ValueError(f"layout {layout} differs from the stored {e.layout} of session {key.session!r}")
        return e
