"""What a `ChatSession` of a model with sliding-window layers keeps in the store.

The global layers' K/V of every token go under the session's key, as for any model. The
sliding layers need only the last tokens their window reaches, so they go in a second entry
holding just those: ``[sliding layers, m, Hkv, D]`` for the history's last ``m`` tokens
(the window and a little slack, so that a next rendering that differs in the last few
tokens still finds what it needs), rewritten whole at the end of each turn.

That entry's KV depends on every earlier token of the history, not only on its own, so its
key names the whole history: the model part is an xxh3-128 of the model fingerprint and
the history's token ids. A history that changed anywhere (an edit, a save that failed, a
truncation not mirrored) finds no such entry: a miss, and the turn recomputes. On overflow
the kept tokens' K/V stay valid (as for the global layers), so the entry is re-keyed to the
truncated history.

A model whose every layer slides has no global entry to name the history's tokens: the
session remembers them (and `ChatSession.save` hands them over for `open`), and its only
entry is the window one. A store with a device tier keeps every token of every layer under
the session's key instead (resident layers hold them all).
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import xxhash

from cattn.hf import PagedLayout
from cattn.store.contract import EntryKey, KVEntry, KVStore
from cattn.store.errors import StoreFullError
from cattn.store.lease import KVLease

SLACK = 64   # tokens kept before each window's reach, in the pages and in the store


def window_key(key: EntryKey, token_ids: Sequence[int]) -> EntryKey:
    """The key of the sliding layers' entry of the history ``token_ids`` of ``key``'s session."""
    digest = xxhash.xxh3_128(key.model.encode())
    digest.update(torch.tensor(list(token_ids), dtype=torch.int64).numpy().tobytes())
    return EntryKey(key.tenant, digest.hexdigest(), key.session)


class WindowEntries:
    """A session's sliding-layer entries in ``store`` (see the module docstring).

    Args:
        store: the session's store.
        key: the session's key (its global layers' entry).
        layout: the patched model's layout; it has sliding and global layers.
    """

    def __init__(self, store: KVStore, key: EntryKey, layout: PagedLayout):
        self.store, self.key = store, key
        self.window = max(w for w in layout.sliding_windows if w is not None)
        self.only = all(w is not None for w in layout.sliding_windows)   # no global entry
        self.remembered: list[int] | None = None    # with `only`: the token ids of the stored history

    @staticmethod
    def applies(layout: PagedLayout, has_device_tier: bool) -> bool:
        """Sliding layers keep only their window in the store: the model has sliding layers and the
        store has no device tier (whose resident layers hold every token)."""
        return any(w is not None for w in layout.sliding_windows) and not has_device_tier

    def lookup(self) -> torch.Tensor | None:
        """``[n] int64``: the token ids of the session's stored history, or None."""
        if not self.only:
            return self.store.lookup(self.key)
        ids = self.remembered
        return None if ids is None or self.store.lookup(window_key(self.key, ids)) is None else torch.tensor(ids)


    def truncate(self, history: Sequence[int], num_drop: int, keep_first: int) -> None:
        """Drop tokens ``[keep_first, keep_first + num_drop)`` of the stored ``history``: from the global
        entry (metadata only) and from the window entry, which takes the truncated history's key."""
        if not self.only:
            self.store.truncate(self.key, num_drop, keep_first)
        self.truncated(history, num_drop, keep_first)
        if self.only:
            stop = min(keep_first + num_drop, len(history))
            self.remembered = list(history[:keep_first]) + list(history[stop:])

    def forget(self) -> None:
        """Delete everything the session keeps in the store."""
        if (history := self.lookup()) is not None:
            self.delete(history.tolist())
        self.remembered = None
        self.store.delete(self.key)

    def acquire(self, history: Sequence[int], reused: int) -> KVLease | None:
        """The sliding layers' K/V of the stored ``history`` (its token ids, the global entry's) as far as
        a turn reusing its first ``reused`` tokens needs them: the held tokens before ``reused``, if they
        include what the window of token ``reused`` reaches. None if the store cannot serve that."""
        key = window_key(self.key, history)
        tail = self.store.lookup(key)
        start = len(history) - (0 if tail is None else tail.numel())
        if tail is None or start < 0 or start > reused or (start and reused - self.window + 1 < start):
            return None
        try:
            lease = self.store.acquire(key, reused - start)
        except StoreFullError:
            return None
        if lease is not None and lease.token_ids.tolist() != list(history[start:reused]):
            lease.release()
            self.store.delete(key)   # not what its key says: a miss, never wrong KV
            return None
        return lease

    def truncated(self, history: Sequence[int], num_drop: int, keep_first: int) -> None:
        """The global entry of ``history`` lost tokens ``[keep_first, keep_first + num_drop)``: give the
        sliding layers' entry the same cut and the key of the history that is left."""
        old = window_key(self.key, history)
        entry = self.store.load(old)
        self.store.delete(old)
        if entry is None:
            return
        n, m = len(history), entry.num_tokens
        start, stop = n - m, min(keep_first + num_drop, n)
        kept = [i - start for i in range(start, n) if not keep_first <= i < stop]
        if not kept:
            return
        index = torch.tensor(kept)
        left = list(history[:keep_first]) + list(history[stop:])
        try:
            self.store.save(window_key(self.key, left), KVEntry(entry.token_ids[index], entry.k[:, index],
                                                                entry.v[:, index]))
        except StoreFullError:
            pass   # no room: the next turn misses and recomputes

    def delete(self, history: Sequence[int] | None) -> None:
        """Forget the sliding layers' entry of ``history`` (the global entry's token ids)."""
        if history is not None:
            self.store.delete(window_key(self.key, history))
