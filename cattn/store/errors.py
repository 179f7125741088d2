"""What the store raises to its callers, in one place: each is a miss or a refusal, never wrong KV.

- `StoreFullError`: the host pool cannot make room (every session pinned or in I/O, or more than
  it holds); the caller recomputes, or saves nothing this turn.
- `HistoryLost`: a history read from disk layer by layer proved corrupt mid-read; the forward that
  used it is redone without it.
- `FormatError`: a stored file or value this version cannot vouch for; the store drops it and
  reports a miss.
- `RemoteTierError`: the shared tier could not answer; an ``OSError``, so the store treats it as a
  lower tier's I/O error (a counted miss).
"""
from __future__ import annotations

__all__ = ["FormatError", "HistoryLost", "RemoteTierError", "StoreFullError"]


class StoreFullError(RuntimeError):
    """The host pool cannot hold what was asked even after evicting everything it may evict."""


class HistoryLost(RuntimeError):
    """A history being read layer by layer turned out corrupt or unreadable mid-read: the layers computed
    so far used KV that is no longer vouched for, so the forward must be redone without it."""


class FormatError(ValueError):
    """A stored file this version cannot vouch for (corrupt, torn, foreign, other format version)."""


class RemoteTierError(OSError):
    """The shared tier could not answer (timeout, connection, auth, cluster error): a miss, never data.
    ``reason`` is ``"timeout"`` or ``"server_error"``."""

    def __init__(self, message: str, reason: str = "server_error"):
        super().__init__(message)
        self.reason = reason
