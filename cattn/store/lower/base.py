"""The interface of the tier under DRAM: the local disk today, a store shared by machines later.

The tiered store keeps all accounting, policy and locking; a lower tier only
stores immutable chunks and per-session manifests and finds them again after a
restart. The store serialises calls about one session; calls about different
sessions come from several threads at once.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

from cattn.store.contract import EntryKey
from cattn.store.layout import KVLayout


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


class LowerTier(Protocol):
    capacity: int

    def scan(self) -> tuple[list[StoredEntry], int]:
        """The committed entries, and how many stored files were corrupt or foreign (and removed).
        Leftovers of interrupted writes are removed too. What the tier cannot use and did not make
        is skipped, never fatal; a tier that counts those keeps the count in ``skipped``."""

    def chunk_nbytes(self, key: EntryKey, layout: KVLayout, chunk_id: str, num_tokens: int) -> int:
        """Bytes `write_chunk` will use, known before writing (for capacity)."""

    def write_chunk(self, key: EntryKey, layout: KVLayout, chunk_id: str, token_ids: torch.Tensor,
                    payload: torch.Tensor) -> int:
        """Store a chunk (``payload``: its ``[n] uint8`` host bytes); returns the bytes used. It must be
        durable by the time the next `write_manifest` of ``key`` returns (one flush for many chunks)."""

    def read_chunk(self, key: EntryKey, layout: KVLayout, chunk_id: str, num_tokens: int,
                   into: torch.Tensor | None = None) -> torch.Tensor:
        """The chunk's token ids, and its payload into ``into`` if given; raises FormatError or OSError
        when it cannot vouch for the bytes."""

    # Optional: ``open_layers(key, layout, chunk_id, num_tokens)``, the chunk open for reading one layer at a
    # time (`fileformat.ChunkLayers`), or None where the tier can only read it whole. A tier without it
    # (Redis alone) serves a layer-wise acquire with whole reads.

    def write_manifest(self, key: EntryKey, incarnation: str, data: bytes) -> int:
        """Make the chunks written before it durable, then replace the manifest of ``incarnation``
        durably and atomically; returns the bytes used."""

    def remove(self, key: EntryKey, incarnation: str, chunk_ids: list[str], manifest: bool) -> None:
        """Remove chunks, and the manifest first if ``manifest`` (that removal is the commit point)."""

    def close(self) -> None:
        """Release the tier (e.g. its directory lock)."""
