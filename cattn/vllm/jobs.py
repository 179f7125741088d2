"""One step's work for the worker, planned by the scheduler side: histories to load into a request's
blocks before the forward, and finished requests' new tokens to save from theirs."""
from __future__ import annotations

from dataclasses import dataclass

from cattn.store.contract import EntryKey


@dataclass
class LoadJob:
    """Load tokens ``[start, num_tokens)`` of ``key`` into the request's blocks."""

    req_id: str
    key: EntryKey
    token_ids: list[int]     # the request's first num_tokens prompt tokens, checked against the store
    start: int               # tokens vLLM already has (its own prefix cache)
    block_ids: list[int]

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)


@dataclass
class SaveJob:
    """Save tokens ``[start, len(token_ids))`` of a finished request as ``key``'s history after ``start``."""

    req_id: str
    key: EntryKey
    token_ids: list[int]     # every token whose KV is in the blocks
    start: int
    block_ids: list[int]
