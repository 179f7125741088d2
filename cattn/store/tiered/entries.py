"""A stored session's bookkeeping: its history as token ranges (views) over immutable chunks.

A save adds a chunk holding only the new tokens and a truncation edits the
ranges, so neither moves stored bytes. A chunk lives in the DRAM pool, in the
lower tier, or both; these records say where, and the store's lock guards them.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass, field

import torch

from cattn.store.layout import KVLayout
from cattn.store.kvformat.segment import QuantSegment, chunk_segment
from cattn.store.lease import Segment


@dataclass(eq=False)
class Chunk:
    id: str
    num_tokens: int
    token_ids: torch.Tensor | None   # None until read from the lower tier (after a restart)
    offset: int | None = None        # host pool extent; None when not in DRAM
    extent_nbytes: int = 0           # its size
    file_nbytes: int = 0             # bytes in the lower tier; 0 when not there
    pins: int = 0                    # leases and writes reading the extent
    live: bool = True                # part of its entry's history (a dead one waits for unpin or manifest)


View = tuple[Chunk, int, int]        # tokens [lo, hi) of a chunk


@dataclass(eq=False)
class Entry:
    layout: KVLayout
    incarnation: str                 # names the manifest; a deleted and re-created session gets a new one
    created_ns: int
    views: list[View] = field(default_factory=list)              # in token order
    chunks: dict[str, Chunk] = field(default_factory=dict)       # every chunk holding bytes anywhere
    version: int = 0
    manifest: tuple[int, int] | None = None    # (version, bytes) of the committed manifest
    io: int = 0
    io_lock: threading.Lock = field(default_factory=threading.Lock)
    reading: threading.Event | None = None     # a promotion to DRAM is in flight
    removed: bool = False
    # Partial prefetch (`cattn.store.prefetch.partial`): its job started while its prefetch was being read, and
    # the read stopped; until its next save or job, a lookup or a load of "all" shows the part in DRAM.
    # The history (views, chunks, files) is unchanged: only what is served is shorter.
    prefetch_stopped: bool = False

    @property
    def num_tokens(self) -> int:
        return sum(hi - lo for _, lo, hi in self.views)

    @property
    def disk_nbytes(self) -> int:
        return sum(c.file_nbytes for c in self.chunks.values()) + (self.manifest[1] if self.manifest else 0)

    def busy(self) -> bool:
        """Leased, or in I/O: not a victim."""
        return self.io > 0 or self.reading is not None or any(c.pins for c in self.chunks.values())


def cut(views: list[View], start: int, stop: int) -> list[View]:
    """The views of tokens ``[start, stop)``."""
    out, pos = [], 0
    for c, lo, hi in views:
        a, b = max(start - pos, 0), min(stop - pos, hi - lo)
        if a < b:
            out.append((c, lo + a, lo + b))
        pos += hi - lo
    return out


def chunks_of(views: list[View]) -> list[Chunk]:
    """The chunks ``views`` name, each once, in order (an edit can name one chunk twice)."""
    return list({id(c): c for c, _, _ in views}.values())


def token_ids_of(views: list[View]) -> torch.Tensor:
    """``[n] int64``: the token ids of ``views``, concatenated."""
    if not views:
        return torch.empty(0, dtype=torch.int64)
    return torch.cat([c.token_ids[lo:hi] for c, lo, hi in views])


def segments_of(views: list[View], layout: KVLayout, pool,
                offsets: dict[int, int] | None = None) -> list[Segment | QuantSegment]:
    """`Segment` views of ``views``' tokens in ``pool`` (a `HostPool`), consecutive from token 0: each
    chunk at its own extent, or at ``offsets[id(chunk)]`` (an extent a read is filling)."""
    out, pos = [], 0
    for c, lo, hi in views:
        offset = c.offset if offsets is None or id(c) not in offsets else offsets[id(c)]
        out.append(chunk_segment(layout, pool.view(offset, layout.payload_nbytes(c.num_tokens)), c.num_tokens,
                                 pos, lo, hi))
        pos += hi - lo
    return out
