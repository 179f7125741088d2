"""One host buffer, allocated (and pinned) once, handed out in aligned extents.

Pinning is slow and pinned memory is scarce, so the DRAM tier pins its whole
capacity up front and never pins per turn; every chunk lives in an extent of this
buffer, which is what lets the GPU copy from it asynchronously.
"""
from __future__ import annotations

import bisect

import torch

from cattn.store.layout import ALIGN, align_up


class HostPool:
    """A ``capacity``-byte uint8 host buffer with a first-fit extent allocator.

    Not thread-safe: its owner serialises calls. Free extents are kept sorted by
    offset and merged with their neighbours on `free`, so a pool that empties
    becomes one extent again.

    Args:
        capacity: bytes; rounded down to a multiple of 256.
        pin: page-lock the buffer; default: when CUDA is available (a CPU-only torch cannot pin).
    """

    def __init__(self, capacity: int, pin: bool | None = None):
        capacity = capacity // ALIGN * ALIGN
        if capacity <= 0:
            raise ValueError(f"capacity must be at least {ALIGN} bytes, got {capacity}")
        self.pinned = torch.cuda.is_available() if pin is None else pin
        self.buffer = torch.empty(capacity, dtype=torch.uint8, pin_memory=self.pinned)
        if not self.pinned:
            self.buffer.zero_()  # fault every page in now, as pinning does: no copy pays for first touch
        self.capacity = capacity
        self.used = 0
        self._free_offsets = [0]         # sorted
        self._free_sizes = {0: capacity}  # offset -> size

    def allocate(self, nbytes: int) -> int | None:
        """Offset of a new extent of ``nbytes`` (rounded up to 256), or None if no free extent holds it."""
        nbytes = align_up(nbytes)
        for offset in self._free_offsets:
            size = self._free_sizes[offset]
            if size >= nbytes:
                self._free_offsets.remove(offset)
                del self._free_sizes[offset]
                if size > nbytes:
                    self._insert(offset + nbytes, size - nbytes)
                self.used += nbytes
                return offset
        return None

    def largest_free(self) -> int:
        return max(self._free_sizes.values(), default=0)

    def free_extent_sizes(self) -> list[int]:
        return list(self._free_sizes.values())

    def free(self, offset: int, nbytes: int) -> None:
        nbytes = align_up(nbytes)
        i = bisect.bisect_left(self._free_offsets, offset)
        if i < len(self._free_offsets) and self._free_offsets[i] < offset + nbytes or \
                i > 0 and self._free_offsets[i - 1] + self._free_sizes[self._free_offsets[i - 1]] > offset:
            raise ValueError(f"extent [{offset}, {offset + nbytes}) overlaps a free extent (double free?)")
        self.used -= nbytes
        if i < len(self._free_offsets) and self._free_offsets[i] == offset + nbytes:  # merge the next one
            nbytes += self._free_sizes.pop(self._free_offsets.pop(i))
        if i > 0 and (prev := self._free_offsets[i - 1]) + self._free_sizes[prev] == offset:  # merge into the previous
            self._free_sizes[prev] += nbytes
        else:
            self._insert(offset, nbytes)

    def view(self, offset: int, nbytes: int) -> torch.Tensor:
        """The extent's bytes as a ``[nbytes] uint8`` view of the buffer."""
        return self.buffer[offset:offset + nbytes]

    def _insert(self, offset: int, size: int) -> None:
        bisect.insort(self._free_offsets, offset)
        self._free_sizes[offset] = size
