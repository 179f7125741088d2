"""Which session leaves a tier when it is full, and which comes up from disk early.

Tiers report what happens (`touch`, `forget`); the job queue reports what is
coming (`update_queue`, `start`); a tier that must make room asks `victim`,
and a tier with idle disk bandwidth asks `prefetch`. A policy keeps its own
order and never moves data itself.

Policies, by name (`cattn.store.policy.make_policy`):

- ``lru``, ``fifo``: the baselines; blind to the queue.
- ``scheduler``: the paper's scheduler-aware fetching and eviction. It looks
  at the queued jobs through two windows (counted in jobs): the prefetch
  window (DRAM capacity / mean session KV size) and the eviction window
  ((DRAM + disk) / mean session KV size). It prefetches disk->DRAM the
  sessions inside the prefetch window; demotes DRAM->disk first the sessions
  with no queued job (least recently used first), then those furthest back
  in the queue; drops from disk first what outlived the TTL, then sessions
  outside the eviction window (least recently used first), and only when
  every candidate is inside the window the one furthest back.
- ``belady``: offline bound. It knows every future job (the whole trace, in
  service order) and moves out the session whose next job is furthest away
  (Belady's MIN). Optimal for one tier of equal-sized entries; with sessions
  of different sizes it is the classic near-optimal reference, not a proof
  of optimality. It also prefetches the next jobs of the trace, queued or not:
  it reads the future twice.
- ``belady-fair``: the same evictions, but it prefetches only jobs already
  queued (inside the prefetch window), as an online prefetcher must: the fair
  reference for the online policies.
- ``value``: see `cattn.store.policy.value` (keeps the histories worth the most GPU
  time per byte, from an online estimate of whether each session returns).
"""
from __future__ import annotations

import heapq
import math
from abc import ABC, abstractmethod
from collections import OrderedDict, defaultdict, deque
from collections.abc import Hashable, Iterable, Sequence, Set
from itertools import count

TIERS = ("dram", "disk")


def as_set(candidates: Iterable[Hashable]):
    """``candidates`` as something that answers `in` in O(1): dict key views and sets as they are (a
    policy is asked about thousands of keys per call: never copy them), anything else as a set."""
    return candidates if isinstance(candidates, Set) else set(candidates)


def _unique_on_disk(keys: Iterable[Hashable], on_disk) -> list[Hashable]:
    return list(dict.fromkeys(k for k in keys if k in on_disk))


def check_tier(tier: str) -> None:
    """ValueError unless ``tier`` is one of `TIERS`."""
    if tier not in TIERS:
        raise ValueError(f"tier must be one of {TIERS}, got {tier!r}")


class Policy(ABC):
    name: str = ""

    @abstractmethod
    def touch(self, key: Hashable, now: float) -> None:
        """``key`` was saved or loaded at time ``now``."""

    def forget(self, key: Hashable) -> None:
        """``key`` left the store for good."""

    def update_queue(self, upcoming: Sequence[Hashable], *, prefetch_window: int | None = None,
                     eviction_window: int | None = None) -> None:
        """The sessions of the queued jobs, soonest first (the scheduler's look-ahead).

        ``upcoming`` is a sequence of keys (a session appears once per queued job); an
        object that also has ``position(key) -> int | None`` (index of the key's first
        queued job) is used as is, so a long queue is never copied. The windows are
        counted in jobs; None means the whole queue.
        """

    def sized(self, key: Hashable, nbytes: int) -> None:
        """``key``'s stored history now takes ``nbytes`` (told after a save; policies may ignore it)."""

    def start(self, key: Hashable, now: float) -> None:
        """The job of ``key`` left the queue and started at time ``now``. Until ``key`` is next
        touched (its history loaded, or saved), queue-aware policies keep it: the job needs it now."""

    def prefetch(self, on_disk: Iterable[Hashable]) -> list[Hashable]:
        """Sessions on disk to bring up to DRAM now, most urgent first."""
        return []

    def expired(self, candidates: Iterable[Hashable], now: float) -> list[Hashable]:
        """Keys among ``candidates`` to drop now whatever the free space (a TTL)."""
        return []

    @abstractmethod
    def victim(self, tier: str, candidates: Iterable[Hashable],
               incoming: Hashable | None = None) -> Hashable | None:
        """The key to move out of ``tier`` (``"dram"``: demote to disk; ``"disk"``: drop), or None
        if no candidate may leave. With ``incoming`` (a session the tier wants to bring in, e.g. a
        prefetch), only a candidate the policy values less than ``incoming`` may leave."""


class LRU(Policy):
    name = "lru"

    def __init__(self):
        self._order: OrderedDict[Hashable, float] = OrderedDict()  # key -> last touch time, oldest first
        self._rank: dict[Hashable, int] = {}  # key -> place in that order (breaks ties of equal times)
        self._ticks = count()

    def touch(self, key, now):
        self._order[key] = now
        self._order.move_to_end(key)
        self._rank[key] = next(self._ticks)

    def forget(self, key):
        self._order.pop(key, None)
        self._rank.pop(key, None)

    def _recency(self, key) -> float:
        # keys never touched (or forgotten) count as the most recent: a tier always touches what it holds
        return self._rank.get(key, math.inf)

    def _oldest(self, cands) -> Hashable | None:
        if not cands:
            return None
        if 4 * len(cands) < len(self._order):  # a small tier: scanning it beats walking the order
            return min(cands, key=self._recency)
        return next((k for k in self._order if k in cands), next(iter(cands)))

    def victim(self, tier, candidates, incoming=None):
        check_tier(tier)
        return self._oldest(as_set(candidates))


class FIFO(LRU):
    """First stored, first out: a touch of a known key does not refresh it."""

    name = "fifo"

    def touch(self, key, now):
        if key not in self._order:
            super().touch(key, now)


class _ListQueue:
    """`position` over a plain list of keys."""

    def __init__(self, upcoming: Sequence[Hashable]):
        self._keys = list(upcoming)
        self._first: dict[Hashable, int] = {}
        for i, k in enumerate(self._keys):
            self._first.setdefault(k, i)

    def position(self, key) -> int | None:
        return self._first.get(key)

    def __len__(self):
        return len(self._keys)

    def __getitem__(self, i):
        return self._keys[i]


class Scheduler(LRU):
    """The paper's scheduler-aware policy; recency breaks ties among sessions with no queued job."""

    name = "scheduler"

    def __init__(self, ttl: float | None = None):
        super().__init__()
        self._running: set[Hashable] = set()  # started, history not loaded yet: needed before anything queued
        if ttl is not None and not ttl > 0:
            raise ValueError(f"ttl must be a positive number of seconds or None, got {ttl!r}")
        self.ttl = ttl
        self._queue = _ListQueue([])
        self.prefetch_window = 0
        self.eviction_window = 0

    def update_queue(self, upcoming, *, prefetch_window=None, eviction_window=None):
        self._queue = upcoming if hasattr(upcoming, "position") else _ListQueue(upcoming)
        n = len(self._queue)
        self.prefetch_window = n if prefetch_window is None else max(0, int(prefetch_window))
        self.eviction_window = n if eviction_window is None else max(0, int(eviction_window))

    def touch(self, key, now):
        super().touch(key, now)
        self._running.discard(key)

    def forget(self, key):
        super().forget(key)
        self._running.discard(key)

    def start(self, key, now):
        self._running.add(key)

    def _distance(self, key) -> float:
        """How far back the key's next queued job is (-1: its job is starting; inf: none queued)."""
        if key in self._running:
            return -1
        pos = self._queue.position(key)
        return math.inf if pos is None else pos

    def prefetch(self, on_disk):
        return _unique_on_disk((self._queue[i] for i in range(min(self.prefetch_window, len(self._queue)))),
                               as_set(on_disk))

    def expired(self, candidates, now):
        if self.ttl is None:
            return []
        cands = as_set(candidates)
        out = []
        for key, last in self._order.items():  # oldest first: stop at the first one still fresh
            if last > now - self.ttl:
                break
            if key in cands and self._distance(key) >= self.eviction_window:
                out.append(key)
        return out

    def victim(self, tier, candidates, incoming=None):
        check_tier(tier)
        cands = as_set(candidates)
        if not cands:
            return None
        floor = -1.0 if incoming is None else self._distance(incoming)
        if tier == "disk" and incoming is None:
            # oldest first among sessions outside the eviction window; usually found at the front
            outside = (k for k in self._order if k in cands and self._distance(k) >= self.eviction_window)
            key = next(outside, None)
            if key is not None:
                return key
        # furthest next job first; no queued job counts as infinitely far, and then the oldest goes
        key = max(cands, key=lambda k: (self._distance(k), -self._recency(k)))
        return key if self._distance(key) > floor else None


class Belady(Policy):
    """Offline bound: moves out the session whose next job is furthest in the whole trace.

    Args:
        accesses: the session of every job of the trace, in the order the jobs will start.
            The replay calls `start(key, now)` as each job starts; it must follow this order.
    """

    name = "belady"

    def __init__(self, accesses: Sequence[Hashable], *, prefetch_queued_only: bool = False):
        self.prefetch_queued_only = prefetch_queued_only
        if prefetch_queued_only:
            self.name = "belady-fair"
        self._queue = _ListQueue([])
        self._uses: dict[Hashable, deque[int]] = defaultdict(deque)
        for i, key in enumerate(accesses):
            self._uses[key].append(i)
        self._accesses = list(accesses)
        self._cursor = 0
        self._live: set[Hashable] = set()
        self._heap: list[tuple[float, int, Hashable]] = []  # (-next use, tiebreak, key), lazily pruned
        self._tiebreak = count()
        self._running: dict[Hashable, int] = {}  # started, history not loaded yet -> index of that job
        self.prefetch_window = 0

    def next_use(self, key) -> float:
        """Index in the trace of ``key``'s next job (inf: none; the current one while it starts)."""
        if key in self._running:
            return self._running[key]
        uses = self._uses.get(key)
        return uses[0] if uses else math.inf

    def _push(self, key):
        heapq.heappush(self._heap, (-self.next_use(key), next(self._tiebreak), key))

    def touch(self, key, now):
        if key not in self._live:
            self._live.add(key)
            self._push(key)
        elif self._running.pop(key, None) is not None:
            self._push(key)  # its heap entry went stale while it started

    def forget(self, key):
        self._live.discard(key)
        self._running.pop(key, None)

    def start(self, key, now):
        if self._cursor >= len(self._accesses) or self._accesses[self._cursor] != key:
            expected = self._accesses[self._cursor] if self._cursor < len(self._accesses) else None
            raise ValueError(f"belady: job {self._cursor} of the trace is {expected!r}, but {key!r} started")
        self._uses[key].popleft()
        if key in self._live:
            self._running[key] = self._cursor
        self._cursor += 1

    def update_queue(self, upcoming, *, prefetch_window=None, eviction_window=None):
        self._queue = upcoming if hasattr(upcoming, "position") else _ListQueue(upcoming)
        self.prefetch_window = len(upcoming) if prefetch_window is None else max(0, int(prefetch_window))

    def prefetch(self, on_disk):
        if self.prefetch_queued_only:  # what has arrived, never the turns still to come
            ahead = (self._queue[i] for i in range(min(self.prefetch_window, len(self._queue))))
            return _unique_on_disk(ahead, as_set(on_disk))
        return _unique_on_disk(self._accesses[self._cursor:self._cursor + self.prefetch_window], as_set(on_disk))

    def victim(self, tier, candidates, incoming=None):
        check_tier(tier)
        cands = as_set(candidates)
        if not cands:
            return None
        if 8 * len(cands) < len(self._heap):
            key = max(cands, key=self.next_use)
        else:
            key, skipped = None, []
            while self._heap:
                neg_next, _, k = self._heap[0]
                if k not in self._live or -neg_next != self.next_use(k):
                    heapq.heappop(self._heap)  # stale entry
                elif k in cands:
                    key = k
                    break
                else:
                    skipped.append(heapq.heappop(self._heap))
            for entry in skipped:
                heapq.heappush(self._heap, entry)
            if key is None:  # candidates the policy was never told about
                key = max(cands, key=self.next_use)
        floor = -1.0 if incoming is None else self.next_use(incoming)
        return key if self.next_use(key) > floor else None

