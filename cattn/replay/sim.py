"""Simulated replay: DRAM and disk tiers (capacities in bytes) driven by a `Policy`, one GPU
server taking jobs first come first served, and times from the cost model. No model runs.

What is modelled: the serving order and the queue the policies look into; where each
session's KV is when its job starts (DRAM, disk, an in-flight prefetch, or gone);
prefetches serialized on the disk's read bandwidth, issued whenever the queue changes (a
job arrives or starts) and when a job's history is saved; layer-wise loading overlapped
with the prefill of the new tokens; context overflow (the oldest tokens are dropped and
the rest of the cache stays valid). The tiers are exclusive, or behave as `TieredStore`'s
(`TierModel`).
What is not: saves and demotions are free for the GPU (asynchronous, as in the paper),
and decode is folded into each job's GPU time (see `CostModel.decode_time`).
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from itertools import count

from cattn.replay.costmodel import CostModel
from cattn.replay.queue import Job, JobQueue
from cattn.store.policy import Policy, make_policy

RECOMPUTE = "recompute"  # no store at all: every turn prefills its whole history


@dataclass(frozen=True)
class TierModel:
    """How the simulated tiers behave; `EXCLUSIVE` (the paper's experiment) or `TIERED_STORE` (ours).

    Attributes:
        inclusive: a session brought back to DRAM keeps its bytes on disk, a demotion writes only
            what the disk lacks, and dropping a session from the disk removes it from both tiers
            (`TieredStore`). False: exclusive tiers, a session is in one of them and the capacity
            is DRAM + disk, as the paper's eviction window counts it.
        prefetch_evicts: a prefetch may demote less urgent sessions to make room. False: it reads
            only into DRAM free below the high watermark (`TieredStore.prefetch`).
        high_watermark, low_watermark: fractions of DRAM; a save that leaves DRAM above the high one
            demotes sessions until DRAM is at the low one.
        prefetch_deadlines: do not issue a prefetch that the disk cannot finish before its job is
            expected to start, and stop reading one whose job started without it: the job
            recomputes its history anyway, and the read would delay the reads queued behind it.
            (`TieredStore` issues every prefetch the policy asks for and finishes it.)
        prefetch_after_save: look for prefetches again once a job's history is saved and DRAM made
            room. (`TieredStore` prefetches only when told of the queue, at `update_queue`.)
    """

    inclusive: bool = False
    prefetch_evicts: bool = True
    prefetch_deadlines: bool = True
    prefetch_after_save: bool = True
    high_watermark: float = 1.0
    low_watermark: float = 1.0

    def __post_init__(self):
        if not 0 < self.low_watermark <= self.high_watermark <= 1:
            raise ValueError(f"need 0 < low_watermark <= high_watermark <= 1, got {self.low_watermark}, "
                             f"{self.high_watermark}")


EXCLUSIVE = TierModel()
# what `TieredStore` does with its defaults (see docs/store.md)
TIERED_STORE = TierModel(inclusive=True, prefetch_evicts=False, high_watermark=0.9, low_watermark=0.7,
                         prefetch_deadlines=False, prefetch_after_save=False)


class SimTiers:
    """DRAM and disk as byte budgets; entries move between them as the policy says.

    A session is in DRAM whole or not at all (``dram``: when its bytes are all there); ``disk``
    holds the bytes of it the disk has (all of it, or with an inclusive disk possibly an older,
    shorter history). An entry bigger than DRAM lives on disk only; one bigger than the disk is
    not kept. A prefetched entry takes its DRAM space when the read is issued and is ready
    ``ready_at`` seconds into the trace. ``expected_start(key, now)`` is when the server expects
    to start ``key``'s next queued job (None: not queued); the replay sets it.
    """

    def __init__(self, dram_bytes: int, disk_bytes: int, policy: Policy, queue: JobQueue, cost: CostModel,
                 model: TierModel = EXCLUSIVE):
        self.dram_bytes, self.disk_bytes, self.model = dram_bytes, disk_bytes, model
        self.policy, self.queue, self.cost = policy, queue, cost
        self.high_bytes = model.high_watermark * dram_bytes
        self.low_bytes = model.low_watermark * dram_bytes
        self.nbytes: dict[str, int] = {}
        self.stored_bytes = 0              # sum of nbytes: the mean session size of the windows
        self.dram: dict[str, float] = {}   # key -> time its bytes are all in DRAM
        self.disk: dict[str, int] = {}     # key -> its bytes on disk
        self.dram_used = self.disk_used = 0
        self.read_free = 0.0               # when the disk's read queue drains
        self.reads: dict[int, tuple[str, float, float]] = {}  # (key, begin, end) of the reads not done, in order
        self._read_ids = count()
        self.expected_start: Callable[[str, float], float | None] = lambda key, now: None
        self.unused_prefetches: set[str] = set()  # prefetched, and their job has not started yet
        self.skipped: set[str] = set()            # a prefetch was not issued: too late for its job
        self.counters = dict(demotions=0, drops=0, prefetches=0, prefetch_bytes=0, prefetch_late=0,
                             prefetch_wasted=0, prefetch_skipped=0, disk_write_bytes=0, recomputed_hits=0)

    def _leave_dram(self, key: str) -> None:
        self.dram_used -= self.nbytes[key]
        del self.dram[key]
        if key in self.unused_prefetches:  # read for nothing: out again before its job
            self.unused_prefetches.discard(key)
            self.counters["prefetch_wasted"] += 1

    def _leave_disk(self, key: str) -> None:
        self.disk_used -= self.disk.pop(key)

    def _remove(self, key: str) -> None:
        if key in self.dram:
            self._leave_dram(key)
        if key in self.disk:
            self._leave_disk(key)
        self.stored_bytes -= self.nbytes.pop(key)

    def _drop(self, key: str) -> None:
        self._remove(key)
        self.policy.forget(key)
        self.counters["drops"] += 1

    def _to_disk(self, key: str, n: int) -> bool:
        """Put ``key``'s ``n`` bytes on disk, dropping the policy's disk victims to make room; False if
        it could not stay there."""
        write = n - self.disk.get(key, 0)
        if self.model.inclusive:
            if n > self.disk_bytes:
                return False
            while self.disk_used + write > self.disk_bytes:  # the store never drops what it is writing
                cands = self.disk.keys() - {key}
                self._drop(self.policy.victim("disk", cands))
        self.disk[key] = n
        self.disk_used += write
        self.counters["disk_write_bytes"] += write
        while self.disk_used > self.disk_bytes:
            self._drop(self.policy.victim("disk", self.disk.keys()))
        return key in self.disk

    def _demote(self, key: str) -> None:
        self._leave_dram(key)
        self.counters["demotions"] += 1
        if not self._to_disk(key, self.nbytes[key]) and key in self.nbytes:
            self._drop(key)  # no room below: gone

    def _refresh_windows(self) -> None:
        if self.nbytes:
            self.queue.mean_session_bytes = self.stored_bytes / len(self.nbytes)
            self.queue.notify()

    def save(self, key: str, nbytes: int, now: float) -> None:
        """The session's whole history (``nbytes``) lands in DRAM after its turn, replacing the old entry
        (an inclusive disk keeps what it had of it: the start of the same history)."""
        on_disk = self.disk.get(key, 0) if self.model.inclusive else 0
        if key in self.nbytes:
            self._remove(key)
        if nbytes <= self.disk_bytes or nbytes <= self.dram_bytes:
            self.nbytes[key] = nbytes
            self.stored_bytes += nbytes
            self.policy.touch(key, now)
            if on_disk:
                self.disk[key] = min(on_disk, nbytes)
                self.disk_used += self.disk[key]
            if nbytes <= self.dram_bytes:
                self.dram[key] = now
                self.dram_used += nbytes
                if self.dram_used > self.high_bytes:
                    while self.dram_used > self.low_bytes:
                        self._demote(self.policy.victim("dram", self.dram.keys()))
            elif not self._to_disk(key, nbytes) and key in self.nbytes:
                self._drop(key)
        else:
            self.policy.forget(key)
        self._refresh_windows()

    def expire(self, now: float) -> None:
        for key in self.policy.expired(self.disk.keys() - self.dram.keys(), now):
            if key in self.disk:
                self._drop(key)

    def prefetch(self, now: float) -> None:
        """Issue the reads the policy asks for, as long as room can be made without demoting
        something the policy values more (or, without ``prefetch_evicts``, fits in free DRAM)."""
        on_disk = self.disk.keys() - self.dram.keys() if self.model.inclusive else self.disk.keys()
        for key in self.policy.prefetch(on_disk):
            n = self.nbytes[key]
            if n > self.dram_bytes or key in self.dram or key not in self.disk:
                continue  # too big, or brought up / dropped by an earlier step of this loop
            if not self.model.prefetch_evicts:
                if self.dram_used + n > self.high_bytes:
                    continue
            else:
                victims, free = [], self.high_bytes - self.dram_used
                cands = dict(self.dram)
                while free < n:
                    v = self.policy.victim("dram", cands.keys(), incoming=key)
                    if v is None:
                        return  # every later key is less urgent still
                    victims.append(v)
                    del cands[v]
                    free += self.nbytes[v]
                for v in victims:
                    self._demote(v)
                if key not in self.disk:  # a demotion overflowed the disk and dropped it
                    continue
            ready = max(self.read_free, now) + self.cost.disk_read_time(n)
            if self.model.prefetch_deadlines and ready > (self.expected_start(key, now) or ready):
                self.skipped.add(key)  # considered again at the next change of the queue
                continue
            self.skipped.discard(key)
            if not self.model.inclusive:
                self._leave_disk(key)
            self.dram[key] = self._queue_read(key, n, now)
            self.dram_used += n
            self.unused_prefetches.add(key)
            self.counters["prefetches"] += 1
            self.counters["prefetch_bytes"] += n

    def find(self, key: str, now: float) -> tuple[str, float]:
        """Where a job starting at ``now`` finds ``key`` ("dram", "disk" or "miss") and the seconds
        it would wait for the disk; `read` commits a read from disk."""
        if key in self.dram:
            wait = max(0.0, self.dram[key] - now)
            return ("dram" if wait == 0 else "disk"), wait  # an unfinished prefetch is a disk read
        if key in self.disk:
            return "disk", max(self.read_free, now) - now + self.cost.disk_read_time(self.nbytes[key])
        return "miss", 0.0

    def _queue_read(self, key: str, nbytes: int, now: float) -> float:
        """Queue a read of ``nbytes`` behind the others; returns when it is done."""
        for rid, (_, _, end) in list(self.reads.items()):  # forget the reads done by now
            if end > now:
                break
            del self.reads[rid]
        begin = max(self.read_free, now)
        self.read_free = begin + self.cost.disk_read_time(nbytes)
        self.reads[next(self._read_ids)] = (key, begin, self.read_free)
        return self.read_free

    def started(self, key: str, now: float, recomputed: bool) -> None:
        """``key``'s job started at ``now`` (and ``recomputed`` its history): account for its prefetch;
        with `TierModel.prefetch_deadlines`, stop the read of one the job did not wait for."""
        if key in self.skipped:
            self.skipped.discard(key)
            self.counters["prefetch_skipped"] += 1
        if key not in self.unused_prefetches:
            return
        self.unused_prefetches.discard(key)
        if self.dram[key] <= now:
            return
        self.counters["prefetch_late"] += 1
        if not (recomputed and self.model.prefetch_deadlines):
            return
        rid = next(r for r, (k, _, _) in reversed(self.reads.items()) if k == key)
        _, begin, end = self.reads.pop(rid)
        saved = end - max(begin, now)  # the rest of it; the reads behind it move up by as much
        for r, (k, b, e) in self.reads.items():
            if b >= end:
                self.reads[r] = (k, b - saved, e - saved)
                if k in self.unused_prefetches:
                    self.dram[k] = e - saved
        self.read_free -= saved

    def read(self, key: str, now: float) -> None:
        if key in self.disk and key not in self.dram:
            self._queue_read(key, self.nbytes[key], now)


@dataclass
class TurnRecord:
    session: str
    turn: int
    arrival: float
    start: float
    tier: str              # where the history was: "first" (none yet), "dram", "disk" or "miss"
    prompt_tokens: int     # history kept + new tokens: what the model attends over
    prefill_tokens: int    # what was actually computed
    stall: float           # seconds waiting for history KV (disk + exposed PCIe)
    prefill: float
    decode: float

    @property
    def ttft(self) -> float:
        return self.stall + self.prefill


@dataclass
class ReplayResult:
    policy: str
    records: list[TurnRecord]
    counters: dict
    dram_bytes: int
    disk_bytes: int


def simulate(jobs: Sequence[Job], policy: str, dram_bytes: int, disk_bytes: int, cost: CostModel, *,
             ttl: float | None = None, tiers: TierModel = EXCLUSIVE,
             on_job: Callable[[], None] | None = None) -> ReplayResult:
    """Replay ``jobs`` (in serving order, as `number_turns` returns them) under one policy.

    Args:
        jobs: the trace.
        policy: a name of `cattn.store.policy.POLICIES`, or ``"recompute"`` (no store).
        dram_bytes, disk_bytes: tier capacities (>= 0).
        cost: model shape and machine.
        ttl: scheduler only: drop sessions untouched this long (seconds).
        tiers: how the tiers behave: `EXCLUSIVE` or `TIERED_STORE`.
        on_job: called after each job (a progress bar).
    """
    for name, value in (("dram_bytes", dram_bytes), ("disk_bytes", disk_bytes)):
        if not isinstance(value, int) or value < 0:
            raise ValueError(f"{name} must be a non-negative int, got {value!r}")
    if policy == RECOMPUTE:
        dram_bytes = disk_bytes = 0
        pol = make_policy("lru")
    else:
        pol = make_policy(policy, accesses=[j.session for j in jobs], ttl=ttl)
    queue = JobQueue(dram_bytes, disk_bytes, [pol])
    store = SimTiers(dram_bytes, disk_bytes, pol, queue, cost, tiers)
    stored = bool(dram_bytes or disk_bytes)
    max_ctx = cost.model.max_context
    context: dict[str, int] = {}  # tokens of each session's conversation so far (after truncation)
    records, i, n, server_free = [], 0, len(jobs), 0.0
    service = 0.0  # recent mean seconds per job (moving average): how fast the queue moves

    def expected_start(key: str, now: float) -> float | None:
        pos = queue.position(key)
        return None if pos is None else max(now, server_free) + pos * service

    store.expected_start = expected_start

    def admit(until: float) -> None:
        """Queue the jobs that arrived by ``until``, each at its arrival: the queue changed, so the
        store looks at it again then (as `TieredStore.update_queue` does)."""
        nonlocal i
        while i < n and jobs[i].arrival <= until:
            queue.push(jobs[i])
            if stored:
                store.prefetch(jobs[i].arrival)
            i += 1

    while i < n or len(queue):
        admit(max(server_free, jobs[i].arrival if not len(queue) else 0.0))
        start = max(server_free, queue.peek().arrival)
        job = queue.pop()
        pol.start(job.session, start)
        new = min(job.new_tokens, max_ctx)
        history = context.get(job.session, 0)
        kept = max(0, min(history, max_ctx - new - job.output_tokens))  # context overflow drops the oldest
        tier, wait = ("first", 0.0) if history == 0 else store.find(job.session, start)
        recompute = cost.prefill_time(new + kept, 0)
        prefill, stall, use_cache = recompute, 0.0, tier in ("dram", "disk")
        if use_cache:
            prefill = cost.prefill_time(new, kept)
            stall = wait + max(0.0, cost.host_to_gpu_time(cost.kv_bytes(kept)) - prefill)  # layer-wise overlap
            # a history whose read takes longer than recomputing it is recomputed (a slow disk, a short history)
            use_cache = stall + prefill <= recompute
            if use_cache:
                store.read(job.session, start)
            else:
                prefill, stall = recompute, 0.0
                store.counters["recomputed_hits"] += 1
        store.started(job.session, start, recomputed=not use_cache)
        decode = cost.decode_time(job.output_tokens, kept + new)
        end = start + stall + prefill + decode
        records.append(TurnRecord(job.session, job.turn, job.arrival, start, tier, kept + new,
                                  new if use_cache else new + kept, stall, prefill, decode))
        server_free = end
        service = end - start if not service else 0.99 * service + 0.01 * (end - start)
        if stored:
            store.expire(start)
            store.prefetch(start)  # after this job's own read, which goes first on the disk
        admit(end)
        context[job.session] = min(kept + new + job.output_tokens, max_ctx)
        if stored:
            store.save(job.session, cost.kv_bytes(context[job.session]), end)
            if tiers.prefetch_after_save:
                store.prefetch(end)
        if on_job is not None:
            on_job()
    return ReplayResult(policy, records, dict(store.counters), dram_bytes, disk_bytes)
