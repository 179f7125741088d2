"""The contract between a session and wherever its KV lives between turns.

A store holds, per `EntryKey`, one session's token ids and its pre-RoPE K/V for
every layer, on the host. It knows tensors and sessions, never models: the
model is only a fingerprint string in the key. A store that cannot vouch for an
entry (corrupt, foreign, other layout) reports a miss; it never returns wrong KV.

`KVStore` is everything a caller may ask of a store: what only some stores can do
better (lend pinned pool pages, take a save straight into them, stream layers from
disk, keep a device tier, prefetch for a queue) has a plain default here, so a
caller never asks which store it has.
"""
from __future__ import annotations

import re
from abc import ABC, abstractmethod
from collections.abc import Hashable, Sequence
from dataclasses import dataclass

import torch

from cattn.store.layout import KVLayout
from cattn.store.lease import KVLease, PendingSave, Segment

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


def check_name(value: str, what: str) -> str:
    """Session ids and tenants become file names: letters, digits, '.', '_', '-', 1-128 chars,
    not starting with '.' or '-' (so never '..' or an option)."""
    if not isinstance(value, str) or not _NAME.fullmatch(value):
        raise ValueError(f"{what} must be 1-128 characters of [A-Za-z0-9._-] starting with a letter or "
                         f"digit, got {value!r}")
    return value


@dataclass(frozen=True)
class EntryKey:
    """Identity of a stored session: no lookup ever crosses tenants or models."""

    tenant: str
    model: str      # fingerprint of weights, shapes, dtype and rope (see cattn.hf.fingerprint)
    session: str

    def __post_init__(self):
        check_name(self.tenant, "tenant")
        check_name(self.session, "session_id")
        if not isinstance(self.model, str) or not re.fullmatch(r"[0-9a-f]{8,128}", self.model):
            raise ValueError(f"model fingerprint must be 8-128 lowercase hex digits, got {self.model!r}")


def check_key(key, what: str = "key") -> EntryKey:
    """``key`` if it is an `EntryKey` whose fields are still valid names; TypeError or ValueError otherwise.

    Every public entry point of a store or tier calls this: the fields become path components and
    remote key names, so a look-alike object (or an `EntryKey` edited with ``object.__setattr__``)
    must never reach them."""
    if type(key) is not EntryKey:
        raise TypeError(f"{what} must be a cattn.store.EntryKey, got {type(key).__name__}")
    key.__post_init__()
    return key


@dataclass
class KVEntry:
    """A session's cached history on the host.

    Attributes:
        token_ids: ``[n] int64``, the tokens whose KV is held, in order.
        k: ``[num_layers, n, num_kv_heads, head_dim]`` pre-RoPE keys (token i has position i).
        v: ``[num_layers, n, num_kv_heads, head_dim]`` values.
    """

    token_ids: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor

    def __post_init__(self):
        n = self.token_ids.shape[0]
        if self.token_ids.ndim != 1 or self.k.ndim != 4 or self.k.shape != self.v.shape or self.k.shape[1] != n:
            raise ValueError(f"KVEntry: token_ids [n], k and v [L, n, Hkv, D] expected, got "
                             f"{tuple(self.token_ids.shape)}, {tuple(self.k.shape)}, {tuple(self.v.shape)}")

    @property
    def num_tokens(self) -> int:
        return self.token_ids.shape[0]

    @property
    def nbytes(self) -> int:
        return self.k.nbytes + self.v.nbytes

    @classmethod
    def from_lease(cls, lease: KVLease) -> KVEntry:
        """A copy of a lease's KV as plain host tensors (`KVLease.from_entry` is the way there)."""
        if not lease.segments:
            lay = lease.layout
            empty = torch.empty(lay.num_layers, 0, lay.num_kv_heads, lay.head_dim, dtype=lay.dtype)
            return cls(lease.token_ids.clone(), empty, empty.clone())
        lay = lease.layout
        k = torch.empty(lay.num_layers, lease.num_tokens, lay.num_kv_heads, lay.head_dim, dtype=lay.dtype)
        v = torch.empty_like(k)
        at = 0
        for s in lease.segments:    # each into its slice: one copy (an 8-bit entry's dequantized on the way)
            s.read_into(k[:, at:at + s.num_tokens], v[:, at:at + s.num_tokens])
            at += s.num_tokens
        return cls(lease.token_ids.clone(), k, v)


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    """Length of the longest common prefix of two token-id lists: how much of a stored history a request
    can reuse."""
    n = min(len(a), len(b))
    return next((i for i in range(n) if a[i] != b[i]), n)


class KVStore(ABC):
    """Where sessions' KV waits between turns. Thread-safe per implementation's doc.

    A store implements the abstract methods; the others are what a store with tiers does better, and
    their defaults are what a store of plain host tensors does.
    """

    # The tier above DRAM (a `cattn.store.device.tier.DeviceTier`: sessions' first layers kept in device
    # pages between turns), or None: what `ChatSession` takes resident layers from.
    device = None

    @abstractmethod
    def lookup(self, key: EntryKey) -> torch.Tensor | None:
        """The stored token ids ``[n] int64`` of ``key``, or None on a miss. Cheap: no KV is moved."""

    @abstractmethod
    def load(self, key: EntryKey, num_tokens: int | None = None) -> KVEntry | None:
        """The first ``num_tokens`` (default all) tokens of ``key``'s entry, or None on a miss."""

    @abstractmethod
    def save(self, key: EntryKey, entry: KVEntry, start: int = 0) -> None:
        """Make ``key``'s history the first ``start`` stored tokens followed by ``entry``.

        ``entry`` holds only the new tokens, so history already in the store is never
        copied again; ``start=0`` replaces the entry. A stored tail past ``start`` (an
        edited or regenerated turn) is discarded. Raises ValueError if fewer than
        ``start`` tokens are stored.
        """

    @abstractmethod
    def truncate(self, key: EntryKey, num_drop: int, keep_first: int = 0) -> None:
        """Drop tokens ``[keep_first, keep_first + num_drop)`` of ``key``'s entry; metadata-only where the tier
        allows."""

    @abstractmethod
    def delete(self, key: EntryKey) -> None:
        """Forget ``key`` (no error if absent)."""

    @abstractmethod
    def stats(self) -> dict:
        """Counters: hits, misses, bytes in and out, evictions, per tier."""

    # ---- what a store with tiers does better ----------------------------------------------------------

    def acquire(self, key: EntryKey, num_tokens: int | None = None, *, layerwise: bool = False) -> KVLease | None:
        """The first ``num_tokens`` (default all) tokens of ``key`` as a `KVLease`, or None on a miss; release
        it when done. With ``layerwise``, layers may arrive one at a time behind the lease (its
        ``wait_layer``). Default: `load` into a lease over plain host tensors, every layer there at once."""
        if not isinstance(layerwise, bool):
            raise TypeError(f"layerwise must be a bool, got {layerwise!r}")
        entry = self.load(key, num_tokens)
        return None if entry is None else KVLease.from_entry(entry)

    def begin_save(self, key: EntryKey, token_ids: torch.Tensor, layout: KVLayout, start: int = 0) -> PendingSave:
        """Host space for ``token_ids [m] int64``'s KV of ``layout``, to fill and then commit (that is
        ``save(key, ..., start)``) or abort; see `PendingSave`. Default: host tensors (pinned where CUDA is
        available, so that device copies into them are asynchronous), committed with `save`."""
        check_key(key)
        if not isinstance(token_ids, torch.Tensor) or token_ids.ndim != 1 or token_ids.dtype != torch.int64:
            raise TypeError(f"token_ids must be a 1-D int64 tensor, got {getattr(token_ids, 'shape', token_ids)!r}")
        shape = (layout.num_layers, token_ids.numel(), layout.num_kv_heads, layout.head_dim)
        pin = torch.cuda.is_available()
        k = torch.empty(shape, dtype=layout.dtype, pin_memory=pin)
        v = torch.empty(shape, dtype=layout.dtype, pin_memory=pin)
        return PendingSave(token_ids, start, [Segment(0, k, v)],
                           commit=lambda: self.save(key, KVEntry(token_ids, k, v), start), abort=lambda: None)

    def dropped_reason(self, key: EntryKey) -> str | None:
        """Why ``key`` is missing when the store dropped it as corrupt (its stored bytes could not be vouched
        for), so that a caller can say more than "not found"; None otherwise. Default: None."""
        return None

    def tokens_in_dram(self, key: EntryKey) -> int:
        """How many of ``key``'s first tokens `acquire` serves without reading below host memory (0 on a
        miss). Default: every stored token."""
        ids = self.lookup(key)
        return 0 if ids is None else ids.numel()

    @property
    def disk_read_bytes_per_s(self) -> float | None:
        """The read bandwidth of the tier below host memory, where known (None: no such tier, or not
        measured yet)."""
        return None

    def update_queue(self, upcoming: Sequence[Hashable], *, prefetch_window: int | None = None,
                     eviction_window: int | None = None, starts_in: Sequence[float] | None = None) -> list[EntryKey]:
        """The job queue changed (``upcoming``: each queued job's session key, soonest first): a store with
        a lower tier prefetches for it. Returns the keys it will read from below host memory, in order.
        Default: nothing to prefetch."""
        for k in upcoming:
            check_key(k, "upcoming[i]")
        return []

    def job_started(self, key: EntryKey) -> None:
        """``key``'s job left the queue and started (a scheduler-aware policy's deadline is gone)."""
        check_key(key)

    def sync(self) -> None:
        """Wait for the store's background work (demotions, prefetches, layer-wise reads). Default: none."""

    def flush(self) -> list[EntryKey]:
        """Write every entry to the store's persistent tier (what a restart finds); returns the sessions it
        could not write. Default: nothing to write."""
        return []

    def close(self, persist: bool = True) -> None:
        """Finish background work, `flush` if ``persist``, release the store's tiers. Default: nothing to do."""


def check_store(store, what: str = "store") -> KVStore:
    """``store`` if it is a `KVStore`; TypeError naming ``what`` otherwise."""
    if not isinstance(store, KVStore):
        raise TypeError(f"{what} must be a cattn KVStore, got {type(store).__name__}")
    return store


def as_lease(source: KVLease | KVEntry | None, what: str = "source") -> KVLease | None:
    """``source`` as a lease: a `KVLease` as it is, a `KVEntry` viewed in place (`KVLease.from_entry`), None
    as None; TypeError naming ``what`` otherwise."""
    if source is None or isinstance(source, KVLease):
        return source
    if isinstance(source, KVEntry):
        return KVLease.from_entry(source)
    raise TypeError(f"{what} must be a cattn KVLease or KVEntry (or None), got {type(source).__name__}")
