"""Which session leaves a tier when it is full, and which comes up from disk early.

Tiers report what happens (`touch`, `forget`); the job queue reports what is
coming (`update_queue`); a tier that must make room asks `victim`. A policy
keeps its own order and never moves data itself.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from collections import OrderedDict
from collections.abc import Hashable, Iterable, Sequence


class Policy(ABC):
    name: str = ""

    @abstractmethod
    def touch(self, key: Hashable, now: float) -> None:
        """``key`` was saved or loaded at time ``now``."""

    def forget(self, key: Hashable) -> None:
        """``key`` left the store for good."""

    def update_queue(self, upcoming: Sequence[Hashable]) -> None:
        """The sessions of the queued jobs, soonest first (the scheduler's look-ahead)."""

    def prefetch(self, on_disk: Iterable[Hashable]) -> list[Hashable]:
        """Sessions on disk to bring up to DRAM now, most urgent first."""
        return []

    @abstractmethod
    def victim(self, tier: str, candidates: Iterable[Hashable]) -> Hashable | None:
        """The key to move out of ``tier`` (``"dram"``: demote to disk; ``"disk"``: drop), or None
        if no candidate may leave."""


class LRU(Policy):
    name = "lru"

    def __init__(self):
        self._order: OrderedDict[Hashable, float] = OrderedDict()

    def touch(self, key, now):
        self._order[key] = now
        self._order.move_to_end(key)

    def forget(self, key):
        self._order.pop(key, None)

    def victim(self, tier, candidates):
        cands = set(candidates)
        return next((k for k in self._order if k in cands), next(iter(cands), None))


class FIFO(LRU):
    """First stored, first out: a touch of a known key does not refresh it."""

    name = "fifo"

    def touch(self, key, now):
        self._order.setdefault(key, now)
