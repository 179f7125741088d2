"""Which session leaves a tier when it is full, and which comes up from disk early: LRU, FIFO, the
paper's scheduler-aware policy, the Belady bounds (`base`) and the ``value`` policy (`value`), and
`make_policy`, each of them by name. Pure Python (no torch): the replay simulator uses them alone."""
from __future__ import annotations

from collections.abc import Hashable, Sequence

from cattn.store.policy.base import FIFO, LRU, Belady, Policy, Scheduler
from cattn.store.policy.value import ValueConfig, ValuePolicy

__all__ = ["POLICIES", "make_policy"]

POLICIES = ("scheduler", "lru", "fifo", "belady", "belady-fair", "value")


def make_policy(name: str, *, accesses: Sequence[Hashable] | None = None, ttl: float | None = None,
                **options) -> Policy:
    """A policy by name: one of `POLICIES`.

    Args:
        name: ``"scheduler"``, ``"lru"``, ``"fifo"``, ``"belady"``, ``"belady-fair"`` or ``"value"``.
        accesses: for ``belady`` and ``belady-fair`` only (required): every job's session, in start order.
        options: for ``value`` only: `cattn.store.policy.value.ValueConfig` fields (the ablations).
        ttl: for ``scheduler`` and ``value`` only: seconds after which an untouched session outside the
            eviction window is dropped from disk.
    """
    if name == "scheduler":
        return Scheduler(ttl=ttl)
    if name == "value":
        return ValuePolicy(ValueConfig(**options), ttl=ttl)
    if options:
        raise ValueError(f"options {sorted(options)} apply to the 'value' policy only, not {name!r}")
    if ttl is not None:
        raise ValueError(f"ttl applies to the 'scheduler' policy only, not {name!r}")
    if name == "lru":
        return LRU()
    if name == "fifo":
        return FIFO()
    if name in ("belady", "belady-fair"):
        if accesses is None:
            raise ValueError(f"the {name!r} policy needs accesses= (every job's session in start order)")
        return Belady(accesses, prefetch_queued_only=name == "belady-fair")
    raise ValueError(f"unknown policy {name!r}; choose one of {', '.join(POLICIES)}")
