"""The worker side: copy stored KV into vLLM's blocks layer by layer, and finished requests' new KV
out of them in the background.

vLLM 0.32 hands the connector one tensor per attention layer in its standardized ``[B, H, N, C]``
view: B blocks, H KV heads, N rows per block, C channels. What a row holds is the backend's business
(the CPU backend's block is, per head, N/2 rows of K for all N tokens, then N/2 rows of V), so the
connector moves whole blocks only: row ``r`` of block ``block_ids[t // N]`` (``r = t % N``) is stored
as "token" ``t`` of the entry, its first C/2 channels as ``k`` and the rest as ``v``, and put back
the same way. Whole blocks in, whole blocks out: exact whatever the layout, and the token ids
beside them say which tokens the block holds.
"""
from __future__ import annotations

import logging
import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import torch

from pathlib import Path

from cattn.store.contract import KVStore
from cattn.store.errors import HistoryLost
from cattn.store.layout import KVLayout
from cattn.store.lower.disk import DiskTier
from cattn.store.policy.base import Scheduler
from cattn.store.tiered.store import TieredStore
from cattn.vllm.config import CattnVllmConfig
from cattn.vllm.block_layout import layout_named
from cattn.vllm.jobs import LoadJob, QueueUpdate, RequestResult, SaveJob, StepReport
from cattn.vllm.shift import ShiftSupport
from cattn.vllm.shifted import copy_layer, plan_copy, stored_tokens_needed, tokens_match

log = logging.getLogger(__name__)


def token_slots(block_ids: list[int], start: int, stop: int, block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(blocks [m] int64, offsets [m] int64)`` of tokens ``[start, stop)`` of a request."""
    pos = torch.arange(start, stop)
    table = torch.tensor(block_ids, dtype=torch.int64)
    return table[pos // block_size], pos % block_size


def failed_blocks(job: LoadJob, block_size: int) -> set[int]:
    """The blocks a failed load would have written: vLLM recomputes them."""
    return set(job.block_ids[job.start // block_size:-(-job.num_tokens // block_size)])


def rank_store(config: CattnVllmConfig, rank: int, world_size: int) -> TieredStore:
    """The store of one rank: its own DRAM pool of ``config.dram_bytes`` and, with a disk tier, its own
    directory ``<disk_dir>/tp<world_size>-rank<rank>`` of ``config.disk_bytes`` (a directory is one
    process's, and a shard is only ever read back by the rank of the same TP size that wrote it)."""
    disk = None
    if config.disk_dir is not None:
        disk = DiskTier(Path(config.disk_dir) / f"tp{world_size}-rank{rank}", config.disk_bytes)
    return TieredStore(config.dram_bytes, disk, policy=Scheduler())


class WorkerSide:
    """Loads and saves for one worker (``rank`` of the engine's workers) over its own ``store``;
    ``layers`` are vLLM's per-layer ``[B, H, N, C]`` caches in model order, H this rank's KV heads;
    ``shifting``: what a shifted load (a truncated conversation) needs, None if they are off."""

    def __init__(self, store: KVStore, block_size: int, layers: dict[str, torch.Tensor], *, rank: int = 0,
                 persist: bool = False, shifting: ShiftSupport | None = None):
        for name, t in layers.items():
            if t.ndim != 4 or t.shape[-1] % 2 or t.shape[2] != block_size:
                raise ValueError(f"KV cache of {name}: a [blocks, heads, {block_size}, channels] view with "
                                 f"an even channel count expected, got {tuple(t.shape)}")
        self.store, self.block_size, self.rank, self.persist = store, block_size, rank, persist
        self.shifting = shifting
        self.names = sorted(layers, key=lambda n: [int(x) for x in re.findall(r"\d+", n)])   # model order
        self.layers = [layers[n] for n in self.names]
        self.layer_index = {n: i for i, n in enumerate(self.names)}
        first = self.layers[0]
        self.layout = KVLayout(len(self.layers), first.shape[1], first.shape[3] // 2, first.dtype)
        self.half = first.shape[3] // 2
        self._loaded: list[threading.Event] = []
        self._load_thread: threading.Thread | None = None
        self._load_errors: set[int] = set()
        self._saver = ThreadPoolExecutor(1, thread_name_prefix="cattn-vllm-save")
        self._saving: list = []           # this step's saves (futures)
        self._flusher = ThreadPoolExecutor(1, thread_name_prefix="cattn-vllm-flush")
        self._flush_queued = False
        self._saved: set[str] = set()
        self._report = StepReport()
        self._lock = threading.Lock()
        self.counters = dict(loads=0, load_failures=0, tokens_loaded=0, load_s=0.0, saves=0, save_failures=0,
                             tokens_saved=0)

    # ---- loads -------------------------------------------------------------------------------------

    def start_loads(self, jobs: list[LoadJob]) -> None:
        """Lease every job's history from the store (a miss or a mismatch fails that job's blocks),
        then copy them in a background thread, layer by layer; `wait_layer` waits for one layer."""
        self.finish_loads()
        bs, work = self.block_size, []
        for job in jobs:
            t0 = time.perf_counter()
            copy = self._plan_shift(job) if job.shift else None
            if job.shift and copy is None:
                lease, ok = None, False
            elif job.shift:
                need = stored_tokens_needed(job, bs)
                lease = self._acquire(job.key, need)
                ok = lease is not None and lease.num_tokens == need and tokens_match(job, lease.token_ids)
            else:
                lease = self._acquire(job.key, job.num_tokens)   # disk: a layer at a time
                ok = (lease is not None and lease.num_tokens == job.num_tokens
                      and torch.equal(lease.token_ids, torch.tensor(job.token_ids, dtype=torch.int64)))
            result = RequestResult(from_disk=lease is not None and lease.source == "disk")
            with self._lock:
                self._report.loads[job.req_id] = result
            if not ok:
                if lease is not None:
                    lease.release()
                self._fail(job, result)
                continue
            blocks, offsets = (copy, None) if copy is not None else token_slots(job.block_ids, job.start,
                                                                                  job.num_tokens, bs)
            work.append((job, lease, blocks, offsets, result, t0))
        if not work:
            return
        self._loaded = [threading.Event() for _ in self.layers]
        self._load_thread = threading.Thread(target=self._copy_in, args=(work,), name="cattn-vllm-load", daemon=True)
        self._load_thread.start()

    def _plan_shift(self, job: LoadJob):
        """The `ShiftedCopy` of a shifted job, or None (logged) when this rank cannot shift exactly."""
        support = self.shifting
        reason = "truncation is off on this worker" if support is None else support.refusal(
            job.num_tokens + job.shift, job.num_tokens)
        if reason is None:
            try:
                return plan_copy(job, support.rope, self.block_size)
            except ValueError as exc:
                reason = str(exc)
        log.warning("cattn: shifted load of request %s refused on rank %d (recomputed): %s",
                    job.req_id, self.rank, reason)
        return None

    def _acquire(self, key, num_tokens: int):
        """A layer-wise lease of ``key``'s first ``num_tokens``, or None: a store that cannot serve it now
        (its DRAM pool full of sessions in use, a lower tier unreachable) is a miss, which vLLM
        recomputes, never a failed step."""
        try:
            return self.store.acquire(key, num_tokens, layerwise=True)
        except Exception:
            log.exception("cattn: rank %d cannot lease session %r; vLLM recomputes it", self.rank, key.session)
            return None

    def _fail(self, job: LoadJob, result: RequestResult) -> None:
        result.load_failed, result.loaded_tokens = True, 0
        with self._lock:
            self._load_errors |= failed_blocks(job, self.block_size)
            self.counters["load_failures"] += 1

    def _copy_in(self, work) -> None:
        done, lost = 0, set()   # lost: jobs whose history failed its checksum while read from disk
        try:
            for layer, event in zip(self.layers, self._loaded):
                for i, (job, lease, blocks, offsets, result, _) in enumerate(work):
                    if i in lost:
                        continue
                    try:
                        lease.wait_layer(done)   # at once, but for a history still being read from disk
                    except HistoryLost:
                        lost.add(i)              # the store dropped it; vLLM recomputes these blocks
                        self._fail(job, result)
                        continue
                    if offsets is None:   # shifted: `blocks` is its ShiftedCopy
                        copy_layer(layer, lease, done, blocks, layout_named(self.shifting.layout_name),
                                   self.shifting.rope)
                        continue
                    for seg in lease.segments:
                        lo, hi = max(seg.start, job.start), min(seg.start + seg.num_tokens, job.num_tokens)
                        if lo >= hi:
                            continue
                        sel = slice(lo - job.start, hi - job.start)
                        k, v = seg.k[done, lo - seg.start:hi - seg.start], seg.v[done, lo - seg.start:hi - seg.start]
                        layer[blocks[sel], :, offsets[sel], :self.half] = k.to(layer.device, non_blocking=True)
                        layer[blocks[sel], :, offsets[sel], self.half:] = v.to(layer.device, non_blocking=True)
                event.set()
                done += 1
            for job, lease, _, _, result, t0 in (w for i, w in enumerate(work) if i not in lost):
                result.loaded_tokens, result.load_s = job.num_tokens - job.start, time.perf_counter() - t0
                with self._lock:
                    self.counters["loads"] += 1
                    self.counters["tokens_loaded"] += result.loaded_tokens
                    self.counters["load_s"] += result.load_s
        except Exception:
            log.exception("cattn: loading KV into vLLM's blocks failed; vLLM recomputes those blocks")
            for i, (job, _, _, _, result, _) in enumerate(work):
                if i not in lost:
                    self._fail(job, result)
        finally:
            for job, lease, *_ in work:
                lease.release()
            for event in self._loaded:
                event.set()

    def wait_layer(self, layer_name: str) -> None:
        i = self.layer_index.get(layer_name)
        if i is not None and i < len(self._loaded):
            self._loaded[i].wait()

    def finish_loads(self) -> None:
        if self._load_thread is not None:
            self._load_thread.join()
            self._load_thread, self._loaded = None, []

    def take_load_errors(self) -> set[int]:
        self.finish_loads()  # a failure is reported in the step that detected it
        with self._lock:
            errors, self._load_errors = self._load_errors, set()
        return errors

    # ---- saves -------------------------------------------------------------------------------------

    def start_saves(self, jobs: list[SaveJob]) -> None:
        """Copy each finished request's new tokens into the store in a background thread (overlapping
        the step's forward); `finish_saves` waits for them, so `take_saved` reports them in the same
        step and vLLM frees their blocks one step after the request finished."""
        for job in jobs:
            try:
                self._saving.append(self._saver.submit(self._save, job))
            except RuntimeError:   # shut down already: the save is lost, which is a future miss
                log.warning("cattn: worker closed, request %s not saved", job.req_id)
                with self._lock:
                    self._report.save_failed.setdefault(job.req_id, set()).add(self.rank)
                    self._saved.add(job.req_id)

    def finish_saves(self) -> None:
        """Wait for the saves started this step (copies into the DRAM tier; the disk write is not
        waited for)."""
        for future in self._saving:
            future.result()
        self._saving = []

    def _flush_soon(self) -> None:
        """Write what was saved through to the disk tier in the background, one flush at a time: a
        listed session is on disk a moment later, and a killed engine's last moment is a miss."""
        with self._lock:
            if self._flush_queued:
                return
            self._flush_queued = True
        try:
            self._flusher.submit(self._flush)
        except RuntimeError:   # closing: the store's close flushes
            pass

    def _flush(self) -> None:
        with self._lock:
            self._flush_queued = False
        try:
            self.store.flush()
        except Exception:
            log.exception("cattn: rank %d could not write saved sessions to disk", self.rank)

    def _save(self, job: SaveJob) -> None:
        ok = False
        try:
            ids = torch.tensor(job.token_ids[job.start:], dtype=torch.int64)
            pending = self.store.begin_save(job.key, ids, self.layout, job.start)
            try:
                blocks, offsets = token_slots(job.block_ids, job.start, len(job.token_ids), self.block_size)
                for seg in pending.segments:
                    sel = slice(seg.start, seg.start + seg.num_tokens)
                    for l, layer in enumerate(self.layers):
                        kv = layer[blocks[sel], :, offsets[sel]]
                        seg.k[l].copy_(kv[..., :self.half])
                        seg.v[l].copy_(kv[..., self.half:])
            except BaseException:
                pending.abort()
                raise
            pending.commit()
            if self.persist:
                self._flush_soon()
            ok = True
            with self._lock:
                self.counters["saves"] += 1
                self.counters["tokens_saved"] += len(ids)
        except Exception:
            log.exception("cattn: saving request %s failed on rank %d (its next turn recomputes it)",
                          job.req_id, self.rank)
            with self._lock:
                self.counters["save_failures"] += 1
        finally:
            with self._lock:   # done or not: vLLM may free the request's blocks
                (self._report.saved if ok else self._report.save_failed).setdefault(job.req_id, set()).add(self.rank)
                self._saved.add(job.req_id)

    def take_saved(self) -> set[str]:
        with self._lock:
            done, self._saved = self._saved, set()
        return done

    def take_report(self) -> StepReport:
        """What this rank's loads and saves did since the last call (read after `take_saved`, so a
        request reported saved here is in the same step's report)."""
        with self._lock:
            report, self._report = self._report, StepReport()
        return report

    def apply_queue(self, update: QueueUpdate) -> None:
        """What vLLM's scheduler showed of its queue, for this rank's store's placement policy."""
        try:
            if update.upcoming is not None:
                self.store.update_queue(update.upcoming)
            for key in update.started:
                self.store.job_started(key)
        except Exception:   # placement is an optimisation: never a failed step
            log.exception("cattn: rank %d could not plan with vLLM's queue", self.rank)

    def take_counters(self) -> dict:
        with self._lock:
            out = dict(self.counters)
            for k in self.counters:
                self.counters[k] = 0.0 if k == "load_s" else 0
        return out

    def close(self) -> None:
        """Finish loads and saves, then close the store (flushing it to its disk tier, if any)."""
        self.finish_loads()
        self._saver.shutdown(wait=True)
        self._flusher.shutdown(wait=True)
        self.store.close()
