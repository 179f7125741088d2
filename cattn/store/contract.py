"""The contract between a session and wherever its KV lives between turns.

A store holds, per `EntryKey`, one session's token ids and its pre-RoPE K/V for
every layer, on the host. It knows tensors and sessions, never models: the
model is only a fingerprint string in the key. A store that cannot vouch for an
entry (corrupt, foreign, other layout) reports a miss; it never returns wrong KV.
"""
from __future__ import annotations

import re
from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch

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


class KVStore(ABC):
    """Where sessions' KV waits between turns. Thread-safe per implementation's doc."""

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
        """Drop tokens ``[keep_first, keep_first + num_drop)`` of ``key``'s entry; metadata-only where the tier allows."""

    @abstractmethod
    def delete(self, key: EntryKey) -> None:
        """Forget ``key`` (no error if absent)."""

    @abstractmethod
    def stats(self) -> dict:
        """Counters: hits, misses, bytes in and out, evictions, per tier."""
