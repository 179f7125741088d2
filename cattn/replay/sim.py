"""Simulated replay: DRAM and disk tiers (capacities in bytes) driven by a `Policy`, one GPU
server taking jobs first come first served, and times from the cost model. No model runs.

What is modelled: the serving order and the queue the policies look into; where each
session's KV is when its job starts (DRAM, disk, an in-flight prefetch, or gone);
prefetches serialized on the disk's read bandwidth, issued whenever a job starts or
ends; layer-wise loading overlapped with the prefill of the new tokens; context
overflow (the oldest tokens are dropped and the rest of the cache stays valid).
What is not: saves and demotions are free for the GPU (asynchronous, as in the paper),
and decode is folded into each job's GPU time (see `CostModel.decode_time`).
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from cattn.replay.costmodel import CostModel
from cattn.replay.queue import Job, JobQueue
from cattn.store.policy import Policy, make_policy

RECOMPUTE = "recompute"  # no store at all: every turn prefills its whole history


class SimTiers:
    """DRAM and disk as byte budgets; entries move between them as the policy says.

    An entry bigger than DRAM lives on disk only; one bigger than the disk is not kept.
    A prefetched entry takes its DRAM space when the read is issued and is ready
    ``ready_at`` seconds into the trace.
    """

    def __init__(self, dram_bytes: int, disk_bytes: int, policy: Policy, queue: JobQueue, cost: CostModel):
        self.dram_bytes, self.disk_bytes = dram_bytes, disk_bytes
        self.policy, self.queue, self.cost = policy, queue, cost
        self.nbytes: dict[str, int] = {}
        self.dram: dict[str, float] = {}   # key -> time its bytes are all in DRAM
        self.disk: dict[str, None] = {}
        self.dram_used = self.disk_used = 0
        self.read_free = 0.0               # when the disk's read queue drains
        self.counters = dict(demotions=0, drops=0, prefetches=0, prefetch_bytes=0, disk_write_bytes=0,
                             recomputed_hits=0)

    def _remove(self, key: str) -> None:
        n = self.nbytes.pop(key)
        if self.dram.pop(key, None) is not None:
            self.dram_used -= n
        elif key in self.disk:
            del self.disk[key]
            self.disk_used -= n

    def _drop(self, key: str) -> None:
        self._remove(key)
        self.policy.forget(key)
        self.counters["drops"] += 1

    def _to_disk(self, key: str, n: int) -> None:
        self.disk[key] = None
        self.disk_used += n
        self.counters["disk_write_bytes"] += n
        while self.disk_used > self.disk_bytes:
            self._drop(self.policy.victim("disk", self.disk.keys()))

    def _demote(self, key: str) -> None:
        n = self.nbytes[key]
        del self.dram[key]
        self.dram_used -= n
        self.counters["demotions"] += 1
        self._to_disk(key, n)

    def _refresh_windows(self) -> None:
        if self.nbytes:
            self.queue.mean_session_bytes = (self.dram_used + self.disk_used) / len(self.nbytes)
            self.queue.notify()

    def save(self, key: str, nbytes: int, now: float) -> None:
        """The session's whole history (``nbytes``) lands in DRAM after its turn, replacing the old entry."""
        if key in self.nbytes:
            self._remove(key)
        if nbytes <= self.disk_bytes or nbytes <= self.dram_bytes:
            self.nbytes[key] = nbytes
            self.policy.touch(key, now)
            if nbytes <= self.dram_bytes:
                self.dram[key] = now
                self.dram_used += nbytes
                while self.dram_used > self.dram_bytes:
                    self._demote(self.policy.victim("dram", self.dram.keys()))
            else:
                self._to_disk(key, nbytes)
        else:
            self.policy.forget(key)
        self._refresh_windows()

    def expire(self, now: float) -> None:
        for key in self.policy.expired(self.disk.keys(), now):
            if key in self.disk:
                self._drop(key)

    def prefetch(self, now: float) -> None:
        """Issue the reads the policy asks for, as long as room can be made without demoting
        something the policy values more."""
        for key in self.policy.prefetch(self.disk.keys()):
            n = self.nbytes[key]
            if n > self.dram_bytes:
                continue
            victims, free = [], self.dram_bytes - self.dram_used
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
            del self.disk[key]
            self.disk_used -= n
            self.read_free = max(self.read_free, now) + self.cost.disk_read_time(n)
            self.dram[key] = self.read_free
            self.dram_used += n
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

    def read(self, key: str, now: float) -> None:
        if key in self.disk:
            self.read_free = max(self.read_free, now) + self.cost.disk_read_time(self.nbytes[key])


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
             ttl: float | None = None, on_job: Callable[[], None] | None = None) -> ReplayResult:
    """Replay ``jobs`` (in serving order, as `number_turns` returns them) under one policy.

    Args:
        jobs: the trace.
        policy: a name of `cattn.store.policy.POLICIES`, or ``"recompute"`` (no store).
        dram_bytes, disk_bytes: tier capacities (>= 0).
        cost: model shape and machine.
        ttl: scheduler only: drop sessions untouched this long (seconds).
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
    tiers = SimTiers(dram_bytes, disk_bytes, pol, queue, cost)
    max_ctx = cost.model.max_context
    context: dict[str, int] = {}  # tokens of each session's conversation so far (after truncation)
    records, i, n, server_free = [], 0, len(jobs), 0.0

    def admit(until: float) -> None:
        nonlocal i
        while i < n and jobs[i].arrival <= until:
            queue.push(jobs[i])
            i += 1

    while i < n or len(queue):
        admit(max(server_free, jobs[i].arrival if not len(queue) else 0.0))
        start = max(server_free, queue.peek().arrival)
        job = queue.pop()
        pol.start(job.session, start)
        new = min(job.new_tokens, max_ctx)
        history = context.get(job.session, 0)
        kept = max(0, min(history, max_ctx - new - job.output_tokens))  # context overflow drops the oldest
        tier, wait = ("first", 0.0) if history == 0 else tiers.find(job.session, start)
        recompute = cost.prefill_time(new + kept, 0)
        prefill, stall, use_cache = recompute, 0.0, tier in ("dram", "disk")
        if use_cache:
            prefill = cost.prefill_time(new, kept)
            stall = wait + max(0.0, cost.host_to_gpu_time(cost.kv_bytes(kept)) - prefill)  # layer-wise overlap
            # a history whose read takes longer than recomputing it is recomputed (a slow disk, a short history)
            use_cache = stall + prefill <= recompute
            if use_cache:
                tiers.read(job.session, start)
            else:
                prefill, stall = recompute, 0.0
                tiers.counters["recomputed_hits"] += 1
        tiers.expire(start)
        tiers.prefetch(start)  # after this job's own read, which goes first on the disk
        decode = cost.decode_time(job.output_tokens, kept + new)
        end = start + stall + prefill + decode
        records.append(TurnRecord(job.session, job.turn, job.arrival, start, tier, kept + new,
                                  new if use_cache else new + kept, stall, prefill, decode))
        server_free = end
        admit(end)
        context[job.session] = min(kept + new + job.output_tokens, max_ctx)
        if dram_bytes or disk_bytes:
            tiers.save(job.session, cost.kv_bytes(context[job.session]), end)
            tiers.prefetch(end)
        if on_job is not None:
            on_job()
    return ReplayResult(policy, records, dict(tiers.counters), dram_bytes, disk_bytes)
