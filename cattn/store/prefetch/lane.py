"""The store's prefetch lane: disk->DRAM reads the policy asks for, one at a time, each chosen when
the one before it ends.

One read at a time because the disk's bandwidth is what a prefetch spends: reads issued
together only share it, and each would hold its DRAM from the moment it was queued. The
next read is picked with what is known when the disk is free: the policy's choices
(`Policy.prefetch`), those that fit in DRAM below the high watermark once sessions the
policy values less are demoted, and, when the
caller gave the queued jobs' expected start times, only those the disk can finish in
time, as many as possible (`cattn.store.prefetch.deadlines.on_time`). The disk's read bandwidth is
measured on these reads, unless given.

With partial prefetch (`cattn.store.prefetch.partial`) a read is worth the part of it that arrives in
time: every read is issued, soonest expected start first, each reads its session oldest
chunk first, and one whose job starts meanwhile stops after the chunk in flight.
"""
from __future__ import annotations

import math
import time
from collections.abc import Callable, Hashable, Sequence

from cattn.store.contract import EntryKey
from cattn.store.tiered.entries import chunks_of
from cattn.store.tiered.migration import prefetch_one
from cattn.store.prefetch.partial import read_oldest_first_locked
from cattn.store.prefetch.deadlines import Read, on_time, soonest_first
from cattn.store.tiered.state import StoreState


class ReadAhead:
    """Plans and runs the prefetches of a `TieredStore`; every method but `run` expects the lock held.

    Args:
        st: the store's state.
        submit: runs a callable in the store's background threads (called with the lock held).
        read_bytes_per_s: the disk's read bandwidth for deadlines (checked by the store); None:
            measured on the reads.
        partial: partial prefetch (`cattn.store.prefetch.partial`): late reads are issued, soonest first, and
            read oldest chunk first; a job that starts mid-read stops it and takes the part in DRAM.
    """

    def __init__(self, st: StoreState, submit: Callable[[Callable[[], None]], None],
                 read_bytes_per_s: float | None = None, partial: bool = False):
        self.st, self.submit, self.partial = st, submit, partial
        self.reading: EntryKey | None = None   # the session the lane is reading now
        self.read_bytes_per_s = read_bytes_per_s
        self.measured = read_bytes_per_s is None
        self.due: dict[Hashable, float] = {}  # key -> time.monotonic() its next job is expected to start
        self.running = False
        self.kicks = 0  # the queue or the tiers changed: what the lane could not read may fit now

    def set_due_locked(self, upcoming: Sequence[Hashable], starts_in: Sequence[float] | None) -> None:
        """Deadlines from the queue: ``starts_in[i]`` seconds from now, the start of ``upcoming[i]``'s job."""
        if starts_in is None:
            self.due = {}
            return
        if len(starts_in) != len(upcoming):
            raise ValueError(f"starts_in must give one time per queued job: {len(starts_in)} for {len(upcoming)}")
        if not all(s >= 0 and math.isfinite(s) for s in starts_in):
            raise ValueError("starts_in must be finite seconds >= 0")
        now, due = time.monotonic(), {}
        for i, s in enumerate(starts_in):
            due.setdefault(upcoming[i], now + s)  # a session's first queued job is the one that matters
        self.due = due

    def started_locked(self, key: Hashable) -> None:
        """``key``'s job started: its deadline is gone; with partial prefetch, a read of it in flight stops
        after its current chunk, and the lane leaves the rest to the job's own load (a new job ends an earlier stop)."""
        self.due.pop(key, None)
        if self.partial and (e := self.st.entries.get(key)) is not None:
            e.prefetch_stopped = key == self.reading

    def _missing_bytes(self, key: EntryKey) -> int:
        return sum(c.extent_nbytes for c in chunks_of(self.st.entries[key].views) if c.offset is None)

    def plan_locked(self, exclude: frozenset | set = frozenset()) -> list[EntryKey]:
        """The reads to do, in order: the policy's choices on disk, cut to those on time if deadlines
        and the bandwidth are known."""
        st = self.st
        on_disk = [k for k, e in st.entries.items() if k not in exclude and e.reading is None
                   and not e.prefetch_stopped and any(c.offset is None for c, _, _ in e.views)]
        allowed = set(on_disk)
        wanted = [k for k in st.policy.prefetch(on_disk) if k in allowed]
        if self.partial and self.due:  # a late read is still worth what arrives of it: none is skipped
            return soonest_first([Read(k, 0.0, self.due.get(k)) for k in wanted])
        if not self.due or not self.read_bytes_per_s:
            return wanted
        reads = [Read(k, self._missing_bytes(k) / self.read_bytes_per_s, self.due.get(k)) for k in wanted]
        return on_time(reads, time.monotonic())[0]

    def kick_locked(self) -> list[EntryKey]:
        """Start the lane if there is something to read; returns the plan."""
        plan = self.plan_locked() if self.st.disk is not None else []
        self.kicks += 1
        if plan and not self.running:
            self.running = True
            self.submit(self.run)
        return plan

    def run(self) -> None:
        """Read the plan's first key that fits, then plan again, until nothing is left to read."""
        st, tried, kicks = self.st, set(), None
        try:
            while True:
                with st.lock:
                    if kicks != self.kicks:  # told of a change since the last plan: try everything again
                        tried, kicks = set(), self.kicks
                    plan = self.plan_locked(tried)
                    if not plan:  # under the same lock as a `kick_locked` that would find the lane busy
                        self.running = False
                        return
                    key = self.reading = plan[0]
                tried.add(key)
                try:
                    done = prefetch_one(st, key, read_oldest_first_locked if self.partial else None)
                finally:
                    with st.lock:
                        self.reading = None
                if done is not None and self.measured:
                    seconds, nbytes = done
                    rate = nbytes / max(seconds, 1e-9)
                    with st.lock:
                        old = self.read_bytes_per_s
                        self.read_bytes_per_s = rate if old is None else 0.8 * old + 0.2 * rate
        except BaseException:
            with st.lock:
                self.running = False
            raise
