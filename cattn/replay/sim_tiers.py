"""The simulated tiers: DRAM and disk as byte budgets, driven by a `Policy`, with reads served one
after another at the disk's bandwidth. `cattn.replay.sim` runs the jobs against them.

`TierModel` says how they behave: as in the paper's experiment (`EXCLUSIVE`) or as
`TieredStore` does (`TIERED_STORE`).
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from itertools import count

from cattn.replay.costmodel import CostModel
from cattn.replay.queue import JobQueue
from cattn.store.policy.base import Policy
from cattn.store.prefetch.deadlines import Read, on_time


@dataclass(frozen=True)
class TierModel:
    """How the simulated tiers behave; `EXCLUSIVE` (the paper's experiment) or `TIERED_STORE` (ours).

    Attributes:
        inclusive: a session brought back to DRAM keeps its bytes on disk, a demotion writes only
            what the disk lacks, and dropping a session from the disk removes it from both tiers
            (`TieredStore`). False: exclusive tiers, a session is in one of them and the capacity
            is DRAM + disk, as the paper's eviction window counts it.
        prefetch_evicts: a prefetch may demote sessions the policy values less to make room below
            the high watermark (as `TieredStore` does). False: it reads only into free DRAM.
        high_watermark, low_watermark: fractions of DRAM; a save that leaves DRAM above the high one
            demotes sessions until DRAM is at the low one.
        prefetch_deadlines: do not issue a prefetch that the disk cannot finish before its job is
            expected to start, and stop reading one whose job started without it: the job
            recomputes its history anyway, and the read would delay the reads queued behind it.
            (`TieredStore` skips late reads when the caller gives the jobs' expected starts, which the
            real replay does not, and finishes a read it began unless ``partial_prefetch`` is on.)
        partial_prefetch: a read is worth its part that arrives in time: a job that starts while its
            prefetch is being read uses the tokens already in DRAM (the oldest first) and prefills the
            rest, the read stops there; a read that cannot finish before its job is expected to start
            is issued all the same (soonest expected start first) instead of skipped. And a job whose
            history is on disk only reads the oldest part of it, layer by layer, while the GPU
            prefills the rest layer by layer (layer l of the rest needs layer l of the part read):
            as much as the disk delivers in the time the prefill of the rest takes.
            `TieredStore(partial_prefetch=True)` with `ChatSession` does all three, a chunk (one save)
            at a time: a job that starts mid-read stops the read after the chunk in flight, takes the
            chunks in DRAM and reads on layer by layer (`cattn.store.tiered.layerwise`), as much as the disk
            delivers while the rest is prefilled (`BufferRule.disk_tokens`, the same balance).
        prefetch_after_save: look for prefetches again once a job's history is saved and DRAM made
            room. (`TieredStore` prefetches only when told of the queue, at `update_queue`.)
        one_read_at_a_time: the disk reads one prefetch at a time, and the next is chosen when it is
            free, with what is known then: the most urgent read that can still finish in time. A read
            claims its DRAM when it starts, not when it is planned, so a backlog of reads does not push
            sessions out of DRAM seconds before their data arrives (`TieredStore`'s prefetch lane).
            False: every read the policy asks for is issued at once and queued on the disk in that order.
    """

    inclusive: bool = False
    partial_prefetch: bool = False
    prefetch_evicts: bool = True
    prefetch_deadlines: bool = True
    prefetch_after_save: bool = True
    one_read_at_a_time: bool = True
    high_watermark: float = 1.0
    low_watermark: float = 1.0

    def __post_init__(self):
        if not 0 < self.low_watermark <= self.high_watermark <= 1:
            raise ValueError(f"need 0 < low_watermark <= high_watermark <= 1, got {self.low_watermark}, "
                             f"{self.high_watermark}")


EXCLUSIVE = TierModel()
EXCLUSIVE_PARTIAL = TierModel(partial_prefetch=True)
# what `TieredStore` does with its defaults (see docs/store.md)
TIERED_STORE = TierModel(inclusive=True, high_watermark=0.9, low_watermark=0.7, prefetch_deadlines=False,
                         prefetch_after_save=False)


class SimTiers:
    """DRAM and disk as byte budgets; entries move between them as the policy says.

    A session is in DRAM whole or not at all (``dram``: when its bytes are all there); ``disk``
    holds the bytes of it the disk has (all of it, or with an inclusive disk possibly an older,
    shorter history). An entry bigger than DRAM lives on disk only; one bigger than the disk is
    not kept. A prefetched entry takes its DRAM space when its read is issued and is ready
    ``dram[key]`` seconds into the trace. ``expected_start(key, now)`` is when the server expects
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
        self.decided_until = 0.0           # one read at a time: prefetches are decided up to this time
        self.reads: dict[int, tuple[str, float, float]] = {}  # (key, begin, end) of the reads not done, in order
        self._read_ids = count()
        self.expected_start: Callable[[str, float], float | None] = lambda key, now: None
        self.unused_prefetches: set[str] = set()  # prefetched, and their job has not started yet
        self.skipped: set[str] = set()            # a prefetch was not issued: too late for its job
        self.counters = dict(demotions=0, drops=0, prefetches=0, prefetch_bytes=0, prefetch_late=0,
                             prefetch_wasted=0, prefetch_skipped=0, disk_write_bytes=0, recomputed_hits=0,
                             dram_kept=0, dram_prefetched=0)

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

    def demote(self, key: str) -> None:
        """Move `key` from DRAM to disk (dropped when the disk has no room for it)."""
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
            self.policy.sized(key, nbytes)
            if on_disk:
                self.disk[key] = min(on_disk, nbytes)
                self.disk_used += self.disk[key]
            if nbytes <= self.dram_bytes:
                self.dram[key] = now
                self.dram_used += nbytes
                if self.dram_used > self.high_bytes:
                    while self.dram_used > self.low_bytes:
                        self.demote(self.policy.victim("dram", self.dram.keys()))
            elif not self._to_disk(key, nbytes) and key in self.nbytes:
                self._drop(key)
        else:
            self.policy.forget(key)
        self._refresh_windows()

    def expire(self, now: float) -> None:
        for key in self.policy.expired(self.disk.keys() - self.dram.keys(), now):
            if key in self.disk:
                self._drop(key)

    def advance(self, now: float) -> None:
        """One read at a time: start the prefetches the disk would have started by ``now``, each when
        the read before it ends. Call it before anything changes at ``now`` (a job arrives or starts,
        a history is saved): until then the queue and the tiers are as the last change left them."""
        if not self.model.one_read_at_a_time:
            return
        t = max(self.read_free, self.decided_until)
        while t <= now and self._issue(t, limit=1):
            t = self.read_free
        self.decided_until = now

    def prefetch(self, now: float) -> None:
        """The queue or the tiers changed at ``now``: issue the reads the policy asks for, as long as
        room can be made without demoting something the policy values more (or, without
        ``prefetch_evicts``, fits in free DRAM). With `TierModel.one_read_at_a_time`, only if the
        disk is free, and only one: the next is chosen when it ends (`advance`)."""
        if not self.model.one_read_at_a_time:
            self._issue(now, limit=None)
        elif self.read_free <= now:
            self._issue(now, limit=1)
            self.decided_until = now

    def _issue(self, now: float, limit: int | None) -> int:
        """Issue up to ``limit`` of the policy's reads at ``now``; returns how many were issued."""
        issued = 0
        on_disk = self.disk.keys() - self.dram.keys() if self.model.inclusive else self.disk.keys()
        wanted = self.policy.prefetch(on_disk)
        if self.model.one_read_at_a_time and self.model.prefetch_deadlines:
            wanted = self._most_on_time(wanted, now)
        for key in wanted:
            if limit is not None and issued >= limit:
                break
            n = self.nbytes[key]
            if n > self.dram_bytes or key in self.dram or key not in self.disk:
                continue  # too big, or brought up / dropped by an earlier step of this loop
            ready = max(self.read_free, now) + self.cost.disk_read_time(n)
            if self.model.prefetch_deadlines and not self.model.partial_prefetch \
                    and ready > (self.expected_start(key, now) or ready):
                self.skipped.add(key)  # considered again at the next decision
                continue
            if not self.model.prefetch_evicts:
                if self.dram_used + n > self.high_bytes:
                    continue
            else:
                victims, free = [], self.high_bytes - self.dram_used
                cands = dict(self.dram)
                while free < n:
                    v = self.policy.victim("dram", cands.keys(), incoming=key)
                    if v is None:
                        return issued  # every later key is less urgent still
                    victims.append(v)
                    del cands[v]
                    free += self.nbytes[v]
                for v in victims:
                    self.demote(v)
                if key not in self.disk:  # a demotion overflowed the disk and dropped it
                    continue
            self.skipped.discard(key)
            if not self.model.inclusive:
                self._leave_disk(key)
            self.dram[key] = self._queue_read(key, n, now)
            self.dram_used += n
            self.unused_prefetches.add(key)
            self.counters["prefetches"] += 1
            self.counters["prefetch_bytes"] += n
            issued += 1
        return issued

    def _most_on_time(self, wanted: list[str], now: float) -> list[str]:
        """Of ``wanted``, the most reads that can all finish before their jobs are expected to start
        (`cattn.store.prefetch.deadlines.on_time`), in the order to read them; those given up are skipped."""
        reads = [Read(k, self.cost.disk_read_time(self.nbytes[k]), self.expected_start(k, now))
                 for k in wanted if self.nbytes[k] <= self.dram_bytes and k in self.disk]
        if self.model.partial_prefetch:  # every read is worth what arrives of it: soonest job first
            return [r.key for r in sorted(reads, key=lambda r: (r.due is None, r.due or 0.0))]
        taken, given_up = on_time(reads, max(self.read_free, now))
        self.skipped.update(given_up)
        return taken

    def arrived_tokens(self, key: str, now: float, tokens: int) -> int:
        """Of ``key``'s ``tokens`` (its whole history), how many a read in flight has brought to DRAM by
        ``now`` (the oldest first); all of them if it is in DRAM, none if its read has not begun."""
        if key not in self.dram:
            return 0
        if self.dram[key] <= now:
            return tokens
        for k, begin, end in reversed(self.reads.values()):
            if k == key:
                return int(tokens * min(1.0, max(0.0, now - begin) / max(end - begin, 1e-12)))
        return 0

    def read_begin(self, key: str) -> float:
        """When the disk begins (or began) the read of ``key`` in flight; ``read_free`` if there is none."""
        return next((b for k, b, _ in reversed(self.reads.values()) if k == key), self.read_free)

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
            if self.dram.get(key, now + 1) <= now:
                self.counters["dram_kept"] += 1  # found in DRAM where its last save left it
            return
        self.unused_prefetches.discard(key)
        if self.dram[key] <= now:
            self.counters["dram_prefetched"] += 1  # brought up from disk in time
            return
        self.counters["prefetch_late"] += 1
        if not (recomputed and (self.model.prefetch_deadlines or self.model.partial_prefetch)):
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

    def read_more(self, key: str, now: float, nbytes: int) -> None:
        """A job starting at ``now`` reads ``nbytes`` more of ``key`` from disk (after its stopped prefetch)."""
        if nbytes > 0:
            self._queue_read(key, nbytes, now)

    def read(self, key: str, now: float, nbytes: int | None = None) -> None:
        """A job starting at ``now`` reads ``key`` from disk (``nbytes`` of it; default all)."""
        if key in self.disk and key not in self.dram:
            self._queue_read(key, self.nbytes[key] if nbytes is None else nbytes, now)
