"""Zero-copy access to stored KV: leases to read it, pending saves to write it.

A `KVLease` pins an entry's chunks in the host pool so that a copy to the GPU
can read them in place (asynchronously, from pinned memory) until it is
released. A `PendingSave` is pool space reserved for new tokens: the GPU copies
each layer's new KV straight into it, and `commit` makes it part of the history
without moving a byte.
"""
from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Literal

import torch

from cattn.store.layout import KVLayout

# Where a lease's tokens were when it was taken: all in host memory (the DRAM tier, or a store without
# tiers), or some of them read from the tier below DRAM for it (the local disk or the shared tier).
LoadSource = Literal["dram", "disk"]


@dataclass(frozen=True)
class Segment:
    """Tokens ``[start, start + m)`` of an entry in host memory, lossless.

    Attributes:
        k, v: ``[num_layers, m, num_kv_heads, head_dim]`` views; each layer's slice ``k[l]`` is contiguous.

    Readers and writers that may meet an 8-bit entry use the methods below, which every segment kind
    has (`cattn.store.kvformat.segment.QuantSegment`: codes and scales, no ``k``/``v``).
    """

    start: int
    k: torch.Tensor
    v: torch.Tensor

    @property
    def num_tokens(self) -> int:
        return self.k.shape[1]

    @property
    def nbytes(self) -> int:
        """Host bytes behind the segment (what a copy of it moves)."""
        return self.k.nbytes + self.v.nbytes

    def layers_from(self, first: int) -> Segment:
        """The same tokens, layers ``first`` and up (views)."""
        return Segment(self.start, self.k[first:], self.v[first:])

    def read_into(self, k: torch.Tensor, v: torch.Tensor) -> None:
        """Copy the segment into ``k, v [num_layers, m, Hkv, D]`` of the model dtype (e.g. its slice of a whole
        entry's tensors)."""
        k.copy_(self.k)
        v.copy_(self.v)

    def layer(self, layer: int, device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
        """Layer ``layer``'s ``k, v [m, Hkv, D]`` in the model dtype on ``device`` (views on the host)."""
        return self.k[layer].to(device), self.v[layer].to(device)

    def write_layer(self, layer: int, k: torch.Tensor, v: torch.Tensor, non_blocking: bool = False) -> None:
        """Store layer ``layer``'s ``k, v [m, Hkv, D]`` (any device; with ``non_blocking``, a copy from the
        device is queued on the current stream and done only when that stream says so)."""
        self.k[layer].copy_(k, non_blocking=non_blocking)
        self.v[layer].copy_(v, non_blocking=non_blocking)

    def scatter_layer(self, layer: int, k_cache: torch.Tensor, v_cache: torch.Tensor, slots: torch.Tensor) -> None:
        """Copy layer ``layer`` into paged caches ``[num_pages, page_size, Hkv, D]`` at ``slots [m] int64`` (on
        the caches' device; host -> device is asynchronous on the current stream)."""
        for cache, part in ((k_cache, self.k), (v_cache, self.v)):
            src = part[layer].to(cache.device, non_blocking=True)   # pinned host -> device; a no-op on CPU
            cache.view(-1, *cache.shape[2:]).index_copy_(0, slots, src)


class KVLease:
    """An entry's first ``num_tokens`` tokens as `Segment` views, valid until `release` (idempotent).

    Use as a context manager, or release explicitly; a lease that is never
    released keeps its chunks in the pool. ``source`` (a `LoadSource`) says where the
    tokens were served from: ``"dram"``, or ``"disk"`` if any had to be read from below DRAM.
    """

    def __init__(self, token_ids: torch.Tensor, segments: list[Segment], layout: KVLayout,
                 on_release: Callable[[], None] | None = None,
                 on_transfer: Callable[[float, float, int], None] | None = None, source: LoadSource = "dram"):
        self.token_ids, self.segments, self.layout, self.source = token_ids, segments, layout, source
        self._on_release, self._on_transfer = on_release, on_transfer
        self._released = threading.Event()

    # The segments' layers arrive one at a time (a layer-wise read from disk, `cattn.store.tiered.layerwise`):
    # a reader calls `wait_layer(l)` before reading layer l of any segment.
    streamed = False

    def wait_layer(self, layer: int) -> None:
        """Block until layer ``layer`` of every segment is in host memory (at once here; see `streamed`)."""

    @classmethod
    def from_entry(cls, entry) -> KVLease:
        """A lease over a `cattn.store.contract.KVEntry`'s own tensors (no copy), e.g. what a `MemoryStore`
        loaded (`KVEntry.from_lease` is the way back)."""
        return cls(entry.token_ids, [Segment(0, entry.k, entry.v)] if entry.num_tokens else [], KVLayout.of(entry))

    def without_first_layers(self, r: int) -> KVLease:
        """A view of this lease's layers ``r`` and up (no copy), for a reader that holds the first ``r``
        elsewhere (a session's resident layers): its layer ``l`` is this lease's ``r + l`` (waited for as
        such when this lease is streamed), and its release and transfers are this lease's."""
        return _LayersFrom(self, r)

    @property
    def num_tokens(self) -> int:
        return self.token_ids.shape[0]

    @property
    def nbytes(self) -> int:
        return sum(s.nbytes for s in self.segments)

    def record_transfer(self, hidden_s: float, exposed_s: float, nbytes: int) -> None:
        """Report a finished load to the store's counters: seconds hidden behind compute, seconds exposed."""
        if self._on_transfer is not None:
            self._on_transfer(hidden_s, exposed_s, nbytes)

    def release(self) -> None:
        if not self._released.is_set():
            self._released.set()
            if self._on_release is not None:
                self._on_release()

    def __enter__(self) -> KVLease:
        return self

    def __exit__(self, *exc) -> None:
        self.release()


class PendingSave:
    """Host pool space for ``token_ids``' KV; fill `segments` (or call `write`), then `commit` or `abort`."""

    def __init__(self, token_ids: torch.Tensor, start: int, segments: list[Segment],
                 commit: Callable[[], None], abort: Callable[[], None]):
        self.token_ids, self.start, self.segments = token_ids, start, segments
        self._commit, self._abort = commit, abort
        self._done = False

    @property
    def num_tokens(self) -> int:
        return self.token_ids.shape[0]

    def write(self, k: torch.Tensor, v: torch.Tensor) -> None:
        """Copy ``k, v [num_layers, num_tokens, num_kv_heads, head_dim]`` (any device) into the segments (an
        8-bit store quantizes them on the way)."""
        for s in self.segments:
            for layer in range(k.shape[0]):
                s.write_layer(layer, k[layer, s.start:s.start + s.num_tokens], v[layer, s.start:s.start + s.num_tokens])

    def commit(self) -> None:
        """Make the tokens the entry's history after its first ``start`` tokens (see
        `cattn.store.contract.KVStore.save`)."""
        self._finish(self._commit)

    def abort(self) -> None:
        """Give the space back; the entry is unchanged."""
        self._finish(self._abort)

    def _finish(self, action: Callable[[], None]) -> None:
        if self._done:
            raise RuntimeError("this save was already committed or aborted")
        self._done = True
        action()


class _LayersFrom(KVLease):
    """`KVLease.without_first_layers`: layers ``r`` and up of ``lease``."""

    def __init__(self, lease: KVLease, r: int):
        lay = lease.layout
        super().__init__(lease.token_ids, [s.layers_from(r) for s in lease.segments],
                         replace(lay, num_layers=lay.num_layers - r),
                         on_release=lease.release, on_transfer=lease.record_transfer, source=lease.source)
        self._lease, self._first = lease, r
        self.streamed = lease.streamed

    def wait_layer(self, layer: int) -> None:
        self._lease.wait_layer(self._first + layer)
