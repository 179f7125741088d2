"""The inference job queue: first come, first served, and the look-ahead it offers the store.

Whenever the queue changes it tells its listeners (the policies) the ordered
sessions of the queued jobs and the paper's two windows, counted in jobs:

    prefetch window = DRAM capacity / mean session KV size
    eviction window = (DRAM + disk capacity) / mean session KV size

The queue itself is the look-ahead handed to `Policy.update_queue`: it answers
``queue[i]`` (session of the i-th queued job) and ``position(session)`` in O(1)
from the front, so a queue of thousands of jobs is never copied per change.
"""
from __future__ import annotations

from collections import defaultdict, deque
from collections.abc import Hashable, Iterable
from dataclasses import dataclass

from cattn.store.policy.base import Policy


@dataclass(frozen=True)
class Job:
    """One user turn waiting to be served.

    Attributes:
        session: the conversation it belongs to.
        arrival: seconds since the start of the trace.
        new_tokens: tokens of the user's new message (the prompt beyond the history).
        output_tokens: tokens the model answers.
        turn: index of this turn in its session (0: the first, which has no history).
    """

    session: str
    arrival: float
    new_tokens: int
    output_tokens: int
    turn: int = 0


class JobQueue:
    """FCFS queue of `Job`s that feeds the policies' look-ahead.

    Args:
        dram_bytes: DRAM tier capacity, for the prefetch window.
        disk_bytes: disk tier capacity, for the eviction window.
        listeners: policies told of every change through `Policy.update_queue`.
    """

    def __init__(self, dram_bytes: int, disk_bytes: int, listeners: Iterable[Policy] = ()):
        for name, value in (("dram_bytes", dram_bytes), ("disk_bytes", disk_bytes)):
            if not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be a non-negative int, got {value!r}")
        self.dram_bytes = dram_bytes
        self.disk_bytes = disk_bytes
        self.listeners = list(listeners)
        self.mean_session_bytes = 0.0  # set by the store as entries come and go
        self._jobs: deque[Job] = deque()
        self._seqs: dict[Hashable, deque[int]] = defaultdict(deque)
        self._head = 0  # sequence number of _jobs[0]; a job's position is its number minus this

    def __len__(self) -> int:
        return len(self._jobs)

    def __getitem__(self, i: int) -> str:
        return self._jobs[i].session

    def position(self, session: Hashable) -> int | None:
        """Index of ``session``'s first queued job, or None if it has none."""
        seqs = self._seqs.get(session)
        return seqs[0] - self._head if seqs else None

    def windows(self) -> tuple[int, int]:
        """(prefetch, eviction) windows in jobs; the whole queue while no session size is known."""
        if self.mean_session_bytes <= 0:
            return len(self._jobs), len(self._jobs)
        return (int(self.dram_bytes // self.mean_session_bytes),
                int((self.dram_bytes + self.disk_bytes) // self.mean_session_bytes))

    def push(self, job: Job) -> None:
        self._seqs[job.session].append(self._head + len(self._jobs))
        self._jobs.append(job)
        self.notify()

    def pop(self) -> Job:
        """The next job to serve (the oldest); IndexError if empty."""
        job = self._jobs.popleft()
        seqs = self._seqs[job.session]
        seqs.popleft()
        if not seqs:
            del self._seqs[job.session]
        self._head += 1
        self.notify()
        return job

    def peek(self) -> Job | None:
        return self._jobs[0] if self._jobs else None

    def notify(self) -> None:
        prefetch, eviction = self.windows()
        for policy in self.listeners:
            policy.update_queue(self, prefetch_window=prefetch, eviction_window=eviction)
