"""Simulated replay: DRAM and disk tiers (capacities in bytes) driven by a `Policy`, one GPU
server taking jobs first come first served, and times from the cost model. No model runs.

What is modelled: the serving order and the queue the policies look into; where each
session's KV is when its job starts (DRAM, disk, an in-flight prefetch, or gone);
prefetches read one at a time at the disk's read bandwidth, decided whenever the queue
changes (a job arrives or starts), when a job's history is saved, and whenever the disk
is free (`SimTiers` in `cattn.replay.sim_tiers`); layer-wise loading overlapped with the
prefill of the new tokens; context overflow (the oldest tokens are dropped and the rest
of the cache stays valid). The tiers are exclusive, or behave as `TieredStore`'s
(`TierModel`).
What is not: saves and demotions are free for the GPU (asynchronous, as in the paper),
and decode is folded into each job's GPU time (see `CostModel.decode_time`).
"""
from __future__ import annotations

import math

import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from cattn.replay.costmodel import CostModel
from cattn.replay.queue import Job, JobQueue
from cattn.replay.sim_tiers import EXCLUSIVE, TIERED_STORE, SimTiers, TierModel
from cattn.store.policy import make_policy
from cattn.store.policy.base import Policy

__all__ = ["EXCLUSIVE", "RECOMPUTE", "TIERED_STORE", "ContextCut", "ReplayResult", "SimTiers", "TierModel",
           "TurnRecord", "TruncationWarning", "context_cut", "simulate", "value_options"]

RECOMPUTE = "recompute"  # no store at all: every turn prefills its whole history
HITS = ("dram", "partial", "disk")


class TruncationWarning(UserWarning):
    """The trace holds prompts longer than the model's context: part of it is not simulated."""


@dataclass(frozen=True)
class ContextCut:
    """What the model's context cuts from a trace (the same for every policy).

    Attributes:
        prompt_tokens: history + new tokens of every turn, as the trace gives them.
        cut_new_tokens: new-message tokens beyond the context (a message longer than the context).
        cut_history_tokens: history tokens dropped because history + new + answer overflow the context.
        turns_cut: turns that lost any token.
    """

    prompt_tokens: int
    cut_new_tokens: int
    cut_history_tokens: int
    turns_cut: int

    @property
    def share(self) -> float:
        return (self.cut_new_tokens + self.cut_history_tokens) / max(1, self.prompt_tokens)

    def message(self, max_context: int) -> str:
        return (f"warning: {self.share:.1%} of the trace's prompt tokens do not fit the model's {max_context:,}-token "
                f"context and are not simulated ({self.turns_cut:,} turns cut; {self.cut_new_tokens:,} tokens of "
                f"new messages, {self.cut_history_tokens:,} of dropped history); use a model shape with a longer "
                f"context (--model, --model-shape) to simulate them")


def _fit(new_tokens: int, output_tokens: int, history: int, max_ctx: int) -> tuple[int, int]:
    """(new tokens, history tokens) a turn keeps within the context: the oldest history goes first."""
    new = min(new_tokens, max_ctx)
    return new, max(0, min(history, max_ctx - new - output_tokens))


def context_cut(jobs: Sequence[Job], max_context: int) -> ContextCut:
    """How much of ``jobs`` (serving order) the context of ``max_context`` tokens cuts."""
    full: dict[str, int] = {}  # the conversation as the trace has it
    kept_ctx: dict[str, int] = {}  # as the model keeps it
    prompt = cut_new = cut_hist = turns = 0
    for j in jobs:
        history, ctx = full.get(j.session, 0), kept_ctx.get(j.session, 0)
        new, kept = _fit(j.new_tokens, j.output_tokens, ctx, max_context)
        prompt += history + j.new_tokens
        cut_new += j.new_tokens - new
        cut_hist += history - kept
        turns += (j.new_tokens - new) + (history - kept) > 0
        full[j.session] = history + j.new_tokens + j.output_tokens
        kept_ctx[j.session] = min(kept + new + j.output_tokens, max_context)
    return ContextCut(prompt, cut_new, cut_hist, turns)


@dataclass
class TurnRecord:
    session: str
    turn: int
    arrival: float
    start: float
    # the tier that served the history: "first" (none yet), "dram", "disk"; or why none did: "miss"
    # (not stored), "recomputed" (stored, but reading it was slower than prefilling it again), "overflow"
    # (the new message and answer fill the context: no history fits)
    tier: str
    prompt_tokens: int     # history kept + new tokens: what the model attends over
    prefill_tokens: int    # what was actually computed
    stall: float           # seconds waiting for history KV (disk + exposed PCIe)
    prefill: float
    decode: float
    history_tokens: int = 0   # the conversation so far, before this turn (what a perfect store would hold)
    reused_tokens: int = 0    # history tokens whose KV was loaded instead of prefilled
    recompute_s: float = 0.0  # seconds this turn would take prefilling its whole prompt (the saving's base)
    # of the reused tokens, those DRAM held when the job started (None: all of them if the tier is "dram" or
    # "partial"); a partial prefetch's job reads the rest from disk itself, and they count as disk reuse
    dram_tokens: int | None = None

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


def serve_turn(store: SimTiers, cost: CostModel, key: str, now: float, found: str, wait: float, new: int, kept: int,
               stored: int, partial: bool) -> tuple[str, int, float, float, bool]:
    """How a turn uses what the store has of its history, the fastest way: ``(tier, reused tokens,
    stall, prefill, reads on)``. ``found`` and ``wait`` are `SimTiers.find`'s; ``kept`` history tokens
    fit the context, the newest ``kept`` of the ``stored`` ones. A history is loaded (DRAM, or disk
    after ``wait``) only if that beats prefilling it again ("recomputed"); with ``partial``, a turn
    whose prefetch is still being read may take the part already in DRAM and prefill the rest
    ("partial"; "disk" if none of it has arrived), the job then reading on by itself (``reads on``:
    the prefetch stops where it is)."""
    recompute = cost.prefill_time(new + kept, 0)
    if found != "first" and not kept:
        return "overflow", 0, 0.0, recompute, False  # the new message and answer fill the context
    if found not in HITS:
        return found, 0, 0.0, recompute, False
    options = [(recompute, "recomputed", 0, 0.0, recompute, False)]
    prefill = cost.prefill_time(new, kept)
    stall = wait + max(0.0, cost.host_to_gpu_time(cost.kv_bytes(kept)) - prefill)  # layer-wise overlap
    options.append((stall + prefill, found, kept, stall, prefill, False))
    if partial and found == "disk" and key in store.dram:  # its prefetch is still being read
        arrived = store.arrived_tokens(key, now, stored)
        have = max(0, min(kept, arrived - (stored - kept)))  # overflow dropped the oldest: they come first
        if kept == stored:
            # the read goes on while the GPU prefills the rest; a read that has just begun (a job that
            # arrived to an empty queue starts as its prefetch does) is a disk read overlapped the same way
            queued = max(0.0, store.read_begin(key) - now)
            options.append((*_overlapped_read(cost, queued, new, kept, have, "partial" if have else "disk"), True))
        elif have:
            prefill = cost.prefill_time(new + kept - have, have)
            stall = max(0.0, cost.host_to_gpu_time(cost.kv_bytes(have)) - prefill)
            options.append((stall + prefill, "partial", have, stall, prefill, True))
    elif partial and found == "disk" and kept == stored:  # on disk only
        queued = wait - cost.disk_read_time(cost.kv_bytes(kept))
        options.append((*_overlapped_read(cost, queued, new, kept, 0, "disk"), False))
    _, tier, reused, stall, prefill, reads_on = min(options, key=lambda o: o[0])  # ties: recompute, no read
    return tier, reused, stall, prefill, reads_on


def _overlapped_read(cost: CostModel, queued: float, new: int, kept: int, have: int,
                     tier: str) -> tuple[float, str, int, float, float]:
    """Read the oldest ``p`` of ``kept`` history tokens (``have`` of them already in DRAM) from disk,
    after ``queued`` seconds behind other reads, while the GPU prefills the other ``kept - p`` and the
    ``new`` ones, both layer by layer: the turn takes max(read, prefill) plus one layer of the read
    (the first layer's wait). The best ``p`` balances the two (bisection: the read grows with ``p``,
    the prefill shrinks). Returns ``(seconds, tier, p, stall, prefill)``."""
    layers = cost.model.num_layers

    def parts(p: int) -> tuple[float, float, float]:
        read = queued + cost.disk_read_time(cost.kv_bytes(p - have))
        prefill = cost.prefill_time(new + kept - p, p)
        return max(read, prefill) + read / layers, read, prefill

    lo, hi = have, kept
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if parts(mid)[1] <= parts(mid)[2]:
            lo = mid
        else:
            hi = mid - 1
    best = min((have, lo, min(lo + 1, kept)), key=lambda p: parts(p)[0])  # reading nothing more may win
    total, _, prefill = parts(best)
    return total, tier, best, total - prefill, prefill


def value_options(cost: CostModel, options: dict | None = None) -> dict:
    """`cattn.store.policy.value.ValueConfig` fields for ``cost``'s model: ``options`` with its KV bytes per token
    and FLOP crossover (params / (layers x heads x head_dim)) filled in."""
    m = cost.model
    out = dict(options or {})
    out.setdefault("bytes_per_token", math.ceil(cost.host_kv_bytes_per_token))   # what a session holds in DRAM, on disk
    out.setdefault("crossover_tokens", m.params / (m.num_layers * m.num_heads * m.head_dim))
    return out


def simulate(jobs: Sequence[Job], policy: str | Policy, dram_bytes: int, disk_bytes: int, cost: CostModel, *,
             ttl: float | None = None, tiers: TierModel = EXCLUSIVE, policy_options: dict | None = None,
             on_job: Callable[[], None] | None = None) -> ReplayResult:
    """Replay ``jobs`` (in serving order, as `number_turns` returns them) under one policy.

    Args:
        jobs: the trace.
        policy: a name of `cattn.store.policy.POLICIES`, ``"recompute"`` (no store), or a `Policy` made for
            this trace (used as is; ``ttl`` and ``policy_options`` must then be left out).
        dram_bytes, disk_bytes: tier capacities (>= 0).
        cost: model shape and machine.
        ttl: scheduler only: drop sessions untouched this long (seconds).
        tiers: how the tiers behave: `EXCLUSIVE`, `EXCLUSIVE_PARTIAL` or `TIERED_STORE`.
        policy_options: ``value`` only: `cattn.store.policy.value.ValueConfig` fields; the model's KV bytes
            per token and FLOP crossover are filled in from ``cost``.
        on_job: called after each job (a progress bar).
    """
    for name, value in (("dram_bytes", dram_bytes), ("disk_bytes", disk_bytes)):
        if not isinstance(value, int) or value < 0:
            raise ValueError(f"{name} must be a non-negative int, got {value!r}")
    if not isinstance(policy, str):     # a Policy instance
        if ttl is not None or policy_options:
            raise ValueError("ttl and policy_options apply to a policy given by name, not to a Policy instance")
        pol = policy
    elif policy == RECOMPUTE:
        dram_bytes = disk_bytes = 0
        pol = make_policy("lru")
    else:
        options = value_options(cost, policy_options) if policy == "value" else dict(policy_options or {})
        pol = make_policy(policy, accesses=[j.session for j in jobs], ttl=ttl, **options)
    cut = context_cut(jobs, cost.model.max_context)
    if cut.share > 0:
        warnings.warn(cut.message(cost.model.max_context), TruncationWarning, stacklevel=2)
    queue = JobQueue(dram_bytes, disk_bytes, [pol])
    store = SimTiers(dram_bytes, disk_bytes, pol, queue, cost, tiers)
    stored = bool(dram_bytes or disk_bytes)
    max_ctx = cost.model.max_context
    context: dict[str, int] = {}  # tokens of each session's conversation so far (after truncation)
    full: dict[str, int] = {}  # the same before truncation: the history a turn could reuse at best
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
            if stored:
                store.advance(jobs[i].arrival)
            queue.push(jobs[i])
            if stored:
                store.prefetch(jobs[i].arrival)
            i += 1

    while i < n or len(queue):
        admit(max(server_free, jobs[i].arrival if not len(queue) else 0.0))
        start = max(server_free, queue.peek().arrival)
        if stored:
            store.advance(start)
        job = queue.pop()
        pol.start(job.session, start)
        history = context.get(job.session, 0)
        new, kept = _fit(job.new_tokens, job.output_tokens, history, max_ctx)  # overflow drops the oldest
        found, wait = ("first", 0.0) if history == 0 else store.find(job.session, start)
        recompute = cost.prefill_time(new + kept, 0)
        tier, reused, stall, prefill, reads_on = serve_turn(store, cost, job.session, start, found, wait, new, kept,
                                                        history, tiers.partial_prefetch)
        in_flight = store.dram.get(job.session, start) > start
        have = max(0, store.arrived_tokens(job.session, start, history) - (history - kept)) if in_flight else 0
        if tier in HITS and not in_flight:
            store.read(job.session, start, cost.kv_bytes(reused) if found == "disk" else None)
        elif found in HITS and tier not in HITS:
            store.counters["recomputed_hits"] += 1
        store.started(job.session, start, recomputed=tier not in HITS or (in_flight and reads_on))
        if in_flight and reads_on and reused:  # what it reads beyond the prefix already in DRAM, now
            store.read_more(job.session, start, cost.kv_bytes(max(0, reused - have)))
        if found in HITS:
            pol.touch(job.session, start)  # its history was loaded (or found too slow): as the store does
        decode = cost.decode_time(job.output_tokens, kept + new)
        end = start + stall + prefill + decode
        records.append(TurnRecord(job.session, job.turn, job.arrival, start, tier, kept + new,
                                  new + kept - reused, stall, prefill, decode,
                                  history_tokens=full.get(job.session, 0), reused_tokens=reused,
                                  recompute_s=recompute + decode,
                                  dram_tokens=reused if tier == "dram" else min(have, reused) if tier == "partial"
                                  else 0))
        full[job.session] = full.get(job.session, 0) + job.new_tokens + job.output_tokens
        server_free = end
        service = end - start if not service else 0.99 * service + 0.01 * (end - start)
        if stored:
            store.expire(start)
            store.prefetch(start)  # after this job's own read, which goes first on the disk
        admit(end)
        context[job.session] = min(kept + new + job.output_tokens, max_ctx)
        if stored:
            store.advance(end)
            store.save(job.session, cost.kv_bytes(context[job.session]), end)
            if tiers.prefetch_after_save:
                store.prefetch(end)
        if on_job is not None:
            on_job()
    return ReplayResult(policy if isinstance(policy, str) else pol.name, records, dict(store.counters), dram_bytes,
                        disk_bytes)
