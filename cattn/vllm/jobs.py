"""What the two sides of the connector tell each other, one engine step at a time.

Scheduler -> workers (in the step's connector metadata): histories to load into a request's blocks
before the forward, finished requests' new tokens to save from theirs, and the queue the store's
scheduler-aware policy plans with. Workers -> scheduler (`StepReport`, one per worker, merged across
ranks by vLLM): what each load and save did. Everything here is plain data: it crosses processes.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from cattn.store.contract import EntryKey


@dataclass
class LoadJob:
    """Load tokens ``[start, num_tokens)`` of ``key`` into the request's blocks.

    Shifted (``shift > 0``, a truncated conversation): the request's tokens ``[0, shift_at)`` are
    stored tokens ``[0, shift_at)`` and its tokens ``[shift_at, num_tokens)`` are stored tokens
    ``[shift_at + shift, num_tokens + shift)``, their keys re-rotated on the way in."""

    req_id: str
    key: EntryKey
    token_ids: list[int]     # the request's first num_tokens prompt tokens, checked against the store
    start: int               # tokens vLLM already has (its own prefix cache)
    block_ids: list[int]
    shift_at: int = 0
    shift: int = 0

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


@dataclass
class QueueUpdate:
    """What vLLM's scheduler showed of its queue since the last step (`KVStore.update_queue`,
    `KVStore.job_started`); ``upcoming`` None: unchanged."""

    upcoming: list[EntryKey] | None = None
    started: list[EntryKey] = field(default_factory=list)


@dataclass
class RequestResult:
    """What the workers did for one request's load, reported back in its ``kv_transfer_params``.

    Merged across ranks: failed if any rank failed (vLLM then recomputes the request's loaded blocks
    on every rank, so the request never mixes loaded and recomputed KV), from disk if any rank read
    its shard from disk, the slowest rank's time."""

    loaded_tokens: int = 0
    load_failed: bool = False
    from_disk: bool = False
    load_s: float = 0.0

    def merge(self, other: RequestResult) -> RequestResult:
        failed = self.load_failed or other.load_failed
        return RequestResult(0 if failed else min(self.loaded_tokens, other.loaded_tokens), failed,
                             self.from_disk or other.from_disk, max(self.load_s, other.load_s))


@dataclass
class StepReport:
    """One step's outcome on the workers: each load's result, and for each finished save the ranks
    that stored their shard (``saved``) or failed to (``save_failed``)."""

    loads: dict[str, RequestResult] = field(default_factory=dict)
    saved: dict[str, set[int]] = field(default_factory=dict)
    save_failed: dict[str, set[int]] = field(default_factory=dict)

    def merge(self, other: StepReport) -> StepReport:
        for req_id, result in other.loads.items():
            mine = self.loads.get(req_id)
            self.loads[req_id] = result if mine is None else mine.merge(result)
        for mine, theirs in ((self.saved, other.saved), (self.save_failed, other.save_failed)):
            for req_id, ranks in theirs.items():
                mine.setdefault(req_id, set()).update(ranks)
        return self

    def __bool__(self) -> bool:
        return bool(self.loads or self.saved or self.save_failed)
