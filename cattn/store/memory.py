"""The simplest store: a dict of host tensors in this process. No capacity, no tiers."""
from __future__ import annotations

import threading

import torch

from cattn.store.contract import EntryKey, KVEntry, KVStore, check_key


class MemoryStore(KVStore):
    """Keeps every entry as plain host tensors; thread-safe. A baseline and a test double."""

    def __init__(self):
        self._entries: dict[EntryKey, KVEntry] = {}
        self._lock = threading.Lock()
        self._stats = dict(hits=0, misses=0, bytes_in=0, bytes_out=0, evictions=0)

    def lookup(self, key: EntryKey) -> torch.Tensor | None:
        check_key(key)
        with self._lock:
            entry = self._entries.get(key)
            return None if entry is None else entry.token_ids.clone()

    def load(self, key: EntryKey, num_tokens: int | None = None) -> KVEntry | None:
        check_key(key)
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                self._stats["misses"] += 1
                return None
            n = entry.num_tokens if num_tokens is None else min(num_tokens, entry.num_tokens)
            out = KVEntry(entry.token_ids[:n].clone(), entry.k[:, :n].clone(), entry.v[:, :n].clone())
            self._stats["hits"] += 1
            self._stats["bytes_out"] += out.nbytes
            return out

    def save(self, key: EntryKey, entry: KVEntry, start: int = 0) -> None:
        check_key(key)
        new = KVEntry(entry.token_ids.cpu(), entry.k.cpu(), entry.v.cpu())
        with self._lock:
            old = self._entries.get(key)
            have = 0 if old is None else old.num_tokens
            if start > have:
                raise ValueError(f"start={start} but only {have} tokens of {key.session!r} are stored")
            if start > 0:
                new = KVEntry(torch.cat([old.token_ids[:start], new.token_ids]),
                              torch.cat([old.k[:, :start], new.k], dim=1), torch.cat([old.v[:, :start], new.v], dim=1))
            self._entries[key] = new
            self._stats["bytes_in"] += entry.nbytes

    def truncate(self, key: EntryKey, num_drop: int, keep_first: int = 0) -> None:
        check_key(key)
        with self._lock:
            e = self._entries.get(key)
            if e is None:
                return
            keep = torch.cat([torch.arange(min(keep_first, e.num_tokens)),
                              torch.arange(min(keep_first + num_drop, e.num_tokens), e.num_tokens)])
            self._entries[key] = KVEntry(e.token_ids[keep], e.k[:, keep], e.v[:, keep])

    def delete(self, key: EntryKey) -> None:
        check_key(key)
        with self._lock:
            self._entries.pop(key, None)

    def stats(self) -> dict:
        with self._lock:
            return {"memory": dict(self._stats)}

    def keys(self) -> list[EntryKey]:
        """The keys of the entries held, in no particular order."""
        with self._lock:
            return list(self._entries)
