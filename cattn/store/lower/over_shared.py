"""A machine's disk in front of a tier shared by machines; each commit is written through to both
(`cattn.store.tiered.migration.publish`).

A session found in the shared tier is indexed as a restart indexes the disk's (`StoreState.index_locked`).

`DiskOverShared(disk, shared)` is the lower tier of a store on one serving machine of
many: every chunk and manifest goes to the local disk (the capacity the store
accounts) and, written through, to the shared tier (`RedisTier`); reads try the disk
first and the shared tier for what the disk lacks (a session another machine saved).
The disk stays the fast, private copy; the shared tier is what lets the next turn of a
session land on any machine. A write the shared tier refuses does not fail the local
one: every later manifest of that session that still names a refused chunk is then
kept out of the shared tier (its readers would find chunks missing), and the shared
tier keeps its last complete one.
"""
from __future__ import annotations

import logging
import threading

import torch

from cattn.store.contract import EntryKey
from cattn.store.layout import KVLayout
from cattn.store.lower.redis_values import parse_frame
from cattn.store.lower.base import LowerTier, StoredEntry

log = logging.getLogger(__name__)


class DiskOverShared(LowerTier):
    """A `LowerTier`: ``disk`` (a `DiskTier`) written and read first, ``shared`` (a `RedisTier`) beside it."""

    finds_shared = True
    write_through = True
    reads_layers = True

    def __init__(self, disk, shared):
        self.disk, self.shared, self.capacity = disk, shared, disk.capacity
        self._refused: dict[EntryKey, set[str]] = {}   # per session: the chunks the shared tier refused
        self._lock = threading.Lock()

    def scan(self) -> tuple[list[StoredEntry], int]:
        return self.disk.scan()

    def chunk_nbytes(self, key: EntryKey, layout: KVLayout, chunk_id: str, num_tokens: int) -> int:
        return self.disk.chunk_nbytes(key, layout, chunk_id, num_tokens)

    def write_chunk(self, key, layout, chunk_id, token_ids, payload) -> int:
        nbytes = self.disk.write_chunk(key, layout, chunk_id, token_ids, payload)
        try:
            self.shared.write_chunk(key, layout, chunk_id, token_ids, payload)
        except OSError as exc:
            log.warning("session %r: the shared tier refused a chunk (%s); kept on the local disk", key.session, exc)
            with self._lock:
                self._refused.setdefault(key, set()).add(chunk_id)
        return nbytes

    def read_chunk(self, key, layout, chunk_id, num_tokens, into: torch.Tensor | None = None) -> torch.Tensor:
        try:
            return self.disk.read_chunk(key, layout, chunk_id, num_tokens, into)
        except FileNotFoundError:   # a chunk another machine wrote: only the shared tier has it
            return self.shared.read_chunk(key, layout, chunk_id, num_tokens, into)

    def open_layers(self, key, layout, chunk_id, num_tokens):
        try:
            return self.disk.open_layers(key, layout, chunk_id, num_tokens)
        except FileNotFoundError:   # only the shared tier has it, and reads it whole
            return None

    def write_manifest(self, key: EntryKey, incarnation: str, data: bytes) -> int:
        nbytes = self.disk.write_manifest(key, incarnation, data)
        named = {c for c, _, _ in parse_frame(data)[0]["chunks"]}
        with self._lock:   # a refused chunk counts until no manifest of the session names it
            refused = self._refused.pop(key, set()) & named
            if refused:
                self._refused[key] = refused
        if refused:
            log.info("session %r: %d chunk(s) it names are not in the shared tier; its manifest kept out",
                     key.session, len(refused))
        else:
            try:
                self.shared.write_manifest(key, incarnation, data)
            except OSError as exc:
                log.warning("session %r: the shared tier refused a manifest (%s)", key.session, exc)
        return nbytes

    def remove(self, key: EntryKey, incarnation: str, chunk_ids: list[str], manifest: bool) -> None:
        with self._lock:   # chunks removed are never named again
            left = self._refused.pop(key, set()).difference(chunk_ids)
            if left:
                self._refused[key] = left
        try:
            self.disk.remove(key, incarnation, chunk_ids, manifest)
        finally:
            self.shared.remove(key, incarnation, chunk_ids, manifest)

    def close(self) -> None:
        try:
            self.disk.close()
        finally:
            self.shared.close()

    def find(self, key: EntryKey) -> StoredEntry | None:
        return self.shared.find(key)

    def tier_stats(self) -> dict:
        return self.shared.tier_stats()

