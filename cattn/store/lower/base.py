"""The interface of the tier under DRAM: the local disk, the shared Redis tier, or the disk in front of it.

The tiered store keeps all accounting, policy and locking; a lower tier only
stores immutable chunks and per-session manifests and finds them again after a
restart. The store serialises calls about one session; calls about different
sessions come from several threads at once.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType

import torch

from cattn.store.contract import EntryKey
from cattn.store.layout import KVLayout
from cattn.store.lower.fileformat import ChunkLayers


@dataclass
class StoredEntry:
    """A committed manifest found by `LowerTier.scan`.

    Attributes:
        chunks: chunk id -> ``(num_tokens, bytes used in the tier)``.
        views: the history as ``(chunk id, lo, hi)`` token ranges, in order.
    """

    key: EntryKey
    layout: KVLayout
    incarnation: str
    created_ns: int
    version: int
    chunks: dict[str, tuple[int, int]]
    views: list[tuple[str, int, int]]
    manifest_nbytes: int


class LowerTier(ABC):
    """What the store asks of the tier under DRAM. The abilities only some tiers have are declared here
    with the answer of a tier without them, so the store asks every tier the same way."""

    capacity: int
    # A tier shared by machines: `find` may find a session `scan` did not report (another machine saved it).
    finds_shared: bool = False
    # Write each commit through to the tier at once (in the background), not only at demotion: a shared
    # tier's next turn of a session may run on another machine.
    write_through: bool = False
    # `open_layers` can open a chunk for reading one layer at a time; a tier without it (Redis alone)
    # serves a layer-wise acquire with whole reads.
    reads_layers: bool = False
    # Stored entries `scan` left in place (not its own, or unreadable): a directory-backed tier counts them.
    skipped: int = 0
    # Sessions the last `scan` found unusable and removed (a corrupt manifest), with why: a caller that
    # then looks one up is told it was dropped, not only that it is missing. Read-only here; a tier that
    # drops sessions at scan time sets its own.
    dropped: Mapping[EntryKey, str] = MappingProxyType({})

    @abstractmethod
    def scan(self) -> tuple[list[StoredEntry], int]:
        """The committed entries, and how many stored files were corrupt or foreign (and removed).
        Leftovers of interrupted writes are removed too. What the tier cannot use and did not make
        is skipped, never fatal; a tier that counts those keeps the count in ``skipped``."""

    @abstractmethod
    def chunk_nbytes(self, key: EntryKey, layout: KVLayout, chunk_id: str, num_tokens: int) -> int:
        """Bytes `write_chunk` will use, known before writing (for capacity)."""

    @abstractmethod
    def write_chunk(self, key: EntryKey, layout: KVLayout, chunk_id: str, token_ids: torch.Tensor,
                    payload: torch.Tensor) -> int:
        """Store a chunk (``payload``: its ``[n] uint8`` host bytes); returns the bytes used. It must be
        durable by the time the next `write_manifest` of ``key`` returns (one flush for many chunks)."""

    @abstractmethod
    def read_chunk(self, key: EntryKey, layout: KVLayout, chunk_id: str, num_tokens: int,
                   into: torch.Tensor | None = None) -> torch.Tensor:
        """The chunk's token ids, and its payload into ``into`` if given; raises FormatError or OSError
        when it cannot vouch for the bytes."""

    def open_layers(self, key: EntryKey, layout: KVLayout, chunk_id: str, num_tokens: int) -> ChunkLayers | None:
        """The chunk open for reading one layer at a time, or None where the tier can only read it whole
        (always, unless `reads_layers`). Raises FormatError or OSError like `read_chunk`."""
        return None

    @abstractmethod
    def write_manifest(self, key: EntryKey, incarnation: str, data: bytes) -> int:
        """Make the chunks written before it durable, then replace the manifest of ``incarnation``
        durably and atomically; returns the bytes used."""

    @abstractmethod
    def remove(self, key: EntryKey, incarnation: str, chunk_ids: list[str], manifest: bool) -> None:
        """Remove chunks, and the manifest first if ``manifest`` (that removal is the commit point)."""

    @abstractmethod
    def close(self) -> None:
        """Release the tier (e.g. its directory lock)."""

    def find(self, key: EntryKey) -> StoredEntry | None:
        """The committed entry of ``key`` if the tier holds one `scan` did not report, else None (asked only
        of a tier that `finds_shared`, with the store's lock released)."""
        return None

    def tier_stats(self) -> dict:
        """The tier's own counters, merged into the store's `stats` (a shared tier's misses by reason...)."""
        return {}
