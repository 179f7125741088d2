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
from dataclasses import dataclass
from typing import Literal

import torch

from cattn.store.layout import KVLayout

# Where a lease's tokens were when it was taken: all in host memory (the DRAM tier, or a store without
# tiers), or some of them read from the tier below DRAM for it (the local disk or the shared tier).
LoadSource = Literal["dram", "disk"]


@dataclass(frozen=True)
class Segment:
    """Tokens ``[start, start + m)`` of an entry in host memory.

    Attributes:
        k, v: ``[num_layers, m, num_kv_heads, head_dim]`` views; each layer's slice ``k[l]`` is contiguous.
    """

    start: int
    k: torch.Tensor
    v: torch.Tensor

    @property
    def num_tokens(self) -> int:
        return self.k.shape[1]


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
        return sum(s.k.nbytes + s.v.nbytes for s in self.segments)

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
        """Copy ``k, v [num_layers, num_tokens, num_kv_heads, head_dim]`` (any device) into the segments."""
        for s in self.segments:
            s.k.copy_(k[:, s.start:s.start + s.num_tokens])
            s.v.copy_(v[:, s.start:s.start + s.num_tokens])

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
        super().__init__(lease.token_ids, [Segment(s.start, s.k[r:], s.v[r:]) for s in lease.segments],
                         KVLayout(lay.num_layers - r, lay.num_kv_heads, lay.head_dim, lay.dtype),
                         on_release=lease.release, on_transfer=lease.record_transfer, source=lease.source)
        self._lease, self._first = lease, r
        self.streamed = lease.streamed

    def wait_layer(self, layer: int) -> None:
        self._lease.wait_layer(self._first + layer)
