"""Which prefetches to read, given that the disk reads one after another and each has a deadline.

A prefetch pays only if its read is done before its job starts: a job that starts without
its history recomputes it, and a read still in flight then delays every read behind it.
With a disk slower than the queue needs (a 13B history from one NVMe SSD takes longer to
read than to recompute), which reads to attempt is a scheduling problem: one machine,
jobs with durations and deadlines, maximize the number done on time. Moore and Hodgson's
algorithm (1968) solves it exactly: take the reads in deadline order and, whenever the
last one taken would be late, give up the longest taken so far.

The simulator (`cattn.replay.sim_tiers`) and `TieredStore` both choose their next read with it; with
partial prefetch (a late read is still worth what arrives of it) both read every one, soonest
deadline first (`soonest_first`).
"""
from __future__ import annotations

import heapq
from collections.abc import Hashable, Sequence
from typing import NamedTuple


class Read(NamedTuple):
    """A prefetch the disk could do.

    Attributes:
        key: the session.
        seconds: how long the read takes (bytes / read bandwidth).
        due: when its job is expected to start (same clock as ``begin`` below); None: not known,
            the read has no deadline.
    """

    key: Hashable
    seconds: float
    due: float | None


def on_time(reads: Sequence[Read], begin: float) -> tuple[list[Hashable], list[Hashable]]:
    """The largest set of ``reads`` that all finish by their deadlines when the disk reads them one
    after another from ``begin``, soonest deadline first.

    Args:
        reads: candidates, in the policy's order of urgency (kept among equal deadlines).
        begin: when the disk is free to start the first of them.

    Returns:
        ``(taken, given_up)``: the keys to read, in the order to read them (by deadline, then the
        reads with no deadline in the policy's order), and the keys whose reads cannot all be on
        time. Optimal in the number of reads on time (Moore-Hodgson), whatever their sizes.
    """
    for r in reads:
        if not r.seconds >= 0:
            raise ValueError(f"a read's seconds must be >= 0, got {r.seconds!r} for {r.key!r}")
    timed = sorted((r for r in reads if r.due is not None), key=lambda r: r.due)
    taken: dict[int, Read] = {}
    # what is taken, longest first; among equally long ones the latest deadline goes, so that equal
    # sizes reduce to "skip the read that cannot make it"
    longest: list[tuple[float, int]] = []
    busy = 0.0
    given_up: list[Hashable] = []
    for i, r in enumerate(timed):
        taken[i] = r
        heapq.heappush(longest, (-r.seconds, -i))
        busy += r.seconds
        if begin + busy > r.due:
            neg_seconds, neg_i = heapq.heappop(longest)
            busy += neg_seconds
            given_up.append(taken.pop(-neg_i).key)
    return [taken[i].key for i in sorted(taken)] + [r.key for r in reads if r.due is None], given_up


def soonest_first(reads: Sequence[Read]) -> list[Hashable]:
    """Every read, those with a deadline soonest first, then those without in the policy's order: the
    order when a late read is still worth the part of it that arrives in time (partial prefetch)."""
    timed = sorted((r for r in reads if r.due is not None), key=lambda r: r.due)
    return [r.key for r in timed] + [r.key for r in reads if r.due is None]
