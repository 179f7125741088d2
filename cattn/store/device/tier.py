"""The top of the hierarchy: sessions' first layers kept in device pages between turns.

A `DeviceTier` holds, per session, the K/V pages of its first ``r`` layers on the
accelerator (a `Resident`), in the page layout the session's `PagedCache` attends
over, so that the next turn attends to those layers in place and streams only layers
``r..L-1`` from DRAM, behind the compute. ``r`` is the paper's pre-loading buffer
(`cattn.store.preload_layers`): with that many layers already there, no layer waits.

It is a cache of the DRAM tier, never the only copy: every token's KV is also saved
to the host store, so anything it drops costs a copy, never a recompute or wrong KV.
Under pressure a session first loses its last layers, one at a time, and only then
leaves whole; the policy (any `Policy`: LRU, FIFO, scheduler-aware) picks which
session. Before a turn allocates its pages, `make_room` releases resident pages until
the device has the memory the turn needs: the tier never causes an out-of-memory error.
On CPU the same code runs with the pages in host memory.

A turn `take`s its session's resident layers (the cache owns them while it runs) and
gives them back with `put`. Truncation and edits are metadata only: a `Resident` is a
list of page ids over its tensors.
"""
from __future__ import annotations

import functools
import logging
import threading
import time
from collections.abc import Callable, Hashable, Sequence

import torch

from cattn.store.contract import EntryKey, check_key
from cattn.store.policy.base import LRU, Policy
from cattn.store.device.resident import DeviceTierConfig, Resident

__all__ = ["DeviceTier", "DeviceTierConfig", "Resident"]

log = logging.getLogger(__name__)


def _free_device_bytes(device: torch.device) -> int:
    """What an allocation can get: the driver's free memory and the blocks torch's caching allocator holds
    unused (freed tensors go back to the allocator, not to the driver)."""
    return (torch.cuda.mem_get_info(device)[0] + torch.cuda.memory_reserved(device)
            - torch.cuda.memory_allocated(device))


def _resident_from(lease, layers: int, page_size: int, headroom: float, device: torch.device) -> Resident:
    """The first ``layers`` layers of a `KVLease`'s history in fresh pages ``0..P-1`` on ``device``."""
    n, lay = lease.num_tokens, lease.layout
    pages = -(-n // page_size)
    capacity = max(pages, int(pages * (1 + headroom)))
    ks, vs = [], []
    for layer in range(min(layers, lay.num_layers)):
        k, v = (torch.empty(capacity, page_size, lay.num_kv_heads, lay.head_dim, dtype=lay.dtype, device=device)
                for _ in range(2))
        for seg in lease.segments:   # tokens in order: token i at slot i (an 8-bit one dequantized on the way)
            seg.scatter_layer(layer, k, v, torch.arange(seg.start, seg.start + seg.num_tokens, device=device))
        ks.append(k)
        vs.append(v)
    return Resident(lease.token_ids.clone(), list(range(pages)), ks, vs)


class DeviceTier:
    """Sessions' first layers in device memory between turns; thread-safe.

    Args:
        config: a `DeviceTierConfig`, or an int: ``budget_bytes``.
        device: where the pages live (``"cpu"`` runs the same code in host memory).
        policy: picks the session that shrinks or leaves under pressure; default `LRU`.
        free_bytes: ``() -> int``, the bytes of device memory an allocation can get now, which `make_room`
            keeps above what a turn needs; called with the tier's lock held, so it must not call the tier.
            Default: the driver's free memory plus what torch's caching allocator holds unused on CUDA;
            elsewhere no probe (no device limit: `make_room` releases nothing).
    """

    def __init__(self, config: DeviceTierConfig | int, device: torch.device | str = "cpu", *,
                 policy: Policy | None = None, free_bytes: Callable[[], int] | None = None):
        if isinstance(config, int) and not isinstance(config, bool):
            config = DeviceTierConfig(budget_bytes=config)
        if not isinstance(config, DeviceTierConfig):
            raise TypeError(f"config must be a DeviceTierConfig or an int, got {type(config).__name__}")
        if policy is not None and not isinstance(policy, Policy):
            raise TypeError(f"policy must be a cattn.store.policy.base.Policy, got {type(policy).__name__}")
        if free_bytes is not None and not callable(free_bytes):
            raise TypeError(f"free_bytes must be a callable returning an int, got {type(free_bytes).__name__}")
        self.config, self.device = config, torch.device(device)
        if free_bytes is None and self.device.type == "cuda":
            free_bytes = functools.partial(_free_device_bytes, self.device)
        self.free_bytes = free_bytes
        if config.budget_bytes is not None:
            self.budget = config.budget_bytes
        elif self.device.type == "cuda":
            self.budget = int(config.budget_fraction * torch.cuda.mem_get_info(self.device)[0])
        else:
            raise ValueError("budget_fraction needs a CUDA device; give budget_bytes on CPU")
        self.policy = policy or LRU()
        self._lock = threading.Lock()
        self._resident: dict[EntryKey, Resident] = {}
        # Taken by a turn's cache, with the tokens it held then: a truncate, a delete or an edit of those
        # tokens meanwhile makes the pages stale, and `put` drops them.
        self._taken: dict[EntryKey, int] = {}
        self._stale: set[EntryKey] = set()
        # Sessions that left under pressure: their share (layers, page size, headroom) for a look-ahead
        # prefetch to bring them back up from DRAM before their next job.
        self._demoted: dict[EntryKey, tuple[int, int]] = {}
        self._wanted: dict[EntryKey, int] = {}    # layers each resident session was given (before shrinking)
        self.counters = dict(hits_full=0, hits_partial=0, misses=0, bytes_not_copied=0, layers_shrunk=0,
                             demotions=0, released_for_room=0, prefetched=0)

    # ---- a turn -------------------------------------------------------------------------------
    def take(self, key: EntryKey, token_ids: torch.Tensor, num_layers: int) -> Resident | None:
        """The resident layers of ``key``'s first ``len(token_ids)`` tokens, out of the tier (the caller's
        cache owns them until `put`), or None. A record whose tokens do not start with ``token_ids``
        (``[n] int64``) is dropped: a miss, never wrong KV. ``num_layers``: the model's, for the hit kind."""
        check_key(key)
        n = token_ids.numel()
        with self._lock:
            res = self._resident.pop(key, None)
            if res is not None:
                self.policy.forget(key)
            if res is None or n == 0 or res.num_tokens < n or not torch.equal(res.token_ids[:n], token_ids.cpu()):
                self.counters["misses"] += 1
                return None
            res.trim_tokens(n)
            self._taken[key] = n
            self._stale.discard(key)
            self.counters["hits_full" if res.num_layers >= num_layers else "hits_partial"] += 1
            return res

    def put(self, key: EntryKey, res: Resident, keep_layers: int) -> None:
        """Keep ``res``'s first ``keep_layers`` layers (capped by the budget) as ``key``'s resident pages;
        shrink or demote others, by the policy, to stay within the budget."""
        check_key(key)
        with self._lock:
            self._taken.pop(key, None)
            if key in self._stale:   # truncated or edited while its turn ran: the pages no longer match
                self._stale.discard(key)
                keep_layers = 0
            old = self._resident.pop(key, None)
            del old
            if res.num_tokens == 0 or res.layer_nbytes == 0:
                keep_layers = 0
            else:
                keep_layers = min(keep_layers, res.num_layers, self.budget // res.layer_nbytes)
            res.trim_layers(keep_layers)
            self._wanted[key] = keep_layers
            if not keep_layers:
                self.policy.forget(key)
                return
            self._resident[key] = res
            self._demoted.pop(key, None)
            self.policy.touch(key, time.time())
            self._within_budget_locked(key)

    def layers_for(self, layer_nbytes: int, rule_layers: int) -> int:
        """Layers a session may keep: the config's ``layers`` or the rule's, within the budget."""
        want = rule_layers if self.config.layers is None else self.config.layers
        return max(0, min(want, self.budget // max(layer_nbytes, 1)))

    def make_room(self, nbytes: int) -> int:
        """Demote resident sessions, the policy's victims first, until `free_bytes` reports ``nbytes`` (plus
        ``reserve_bytes``) free or nothing is resident: called before a turn allocates its pages. The probe is
        asked again after each demotion, so no session leaves that the room did not need. Without a probe (not
        CUDA, none given) there is no device limit to keep within. Returns the sessions demoted (each also
        counted in ``released_for_room``); their KV stays in DRAM."""
        if isinstance(nbytes, bool) or not isinstance(nbytes, int) or nbytes < 0:
            raise ValueError(f"nbytes must be an int >= 0, got {nbytes!r}")
        if self.free_bytes is None:
            return 0
        need, released = nbytes + self.config.reserve_bytes, 0
        with self._lock:
            while self._resident and self.free_bytes() < need:
                self._demote_locked(self._victim_locked(None))
                self.counters["released_for_room"] += 1
                released += 1
        return released

    def record_not_copied(self, nbytes: int) -> None:
        with self._lock:
            self.counters["bytes_not_copied"] += nbytes

    # ---- what the store forwards --------------------------------------------------------------
    def truncate(self, key: EntryKey, num_drop: int, keep_first: int = 0) -> None:
        """Drop tokens ``[keep_first, keep_first + num_drop)``: page ids only, when the cut falls on page
        boundaries (as a session's overflow drop does); otherwise the resident pages are dropped."""
        check_key(key)
        with self._lock:
            if key in self._taken:
                self._stale.add(key)
            res = self._resident.get(key)
            if res is None or num_drop <= 0 or keep_first >= res.num_tokens:
                return
            ps, n = res.page_size, res.num_tokens
            stop = min(keep_first + num_drop, n)
            if keep_first % ps or (stop % ps and stop != n):
                self._drop_locked(key)
                return
            res.token_ids = torch.cat([res.token_ids[:keep_first], res.token_ids[stop:]])
            res.pages = res.pages[:keep_first // ps] + res.pages[-(-stop // ps):]

    def trim(self, key: EntryKey, num_tokens: int) -> None:
        """The store's history of ``key`` now differs after its first ``num_tokens`` tokens (a save from there)."""
        check_key(key)
        with self._lock:
            if self._taken.get(key, 0) > num_tokens:
                self._stale.add(key)
            res = self._resident.get(key)
            if res is not None and res.num_tokens > num_tokens:
                res.trim_tokens(num_tokens)
                if num_tokens == 0:
                    self._drop_locked(key)

    def delete(self, key: EntryKey) -> None:
        check_key(key)
        with self._lock:
            if key in self._taken:
                self._stale.add(key)
            if key in self._resident:
                self._drop_locked(key)

    def update_queue(self, upcoming: Sequence[Hashable], *, prefetch_window: int | None = None,
                     eviction_window: int | None = None) -> None:
        """Tell the policy of the job queue: sessions with no queued job shrink and leave first."""
        with self._lock:
            self.policy.update_queue(upcoming, prefetch_window=prefetch_window, eviction_window=eviction_window)

    def prefetch(self, store, in_dram: set[EntryKey]) -> list[EntryKey]:
        """Bring demoted sessions that the policy wants up soon (the look-ahead window: `Policy.prefetch`)
        back from the DRAM tier of ``store`` (a `TieredStore`; only sessions in ``in_dram``), their share of
        layers copied into fresh pages; only by demoting sessions the policy values less. Returns the
        sessions brought up."""
        with self._lock:
            cands = [k for k in self._demoted if k in in_dram]
            wanted = [k for k in self.policy.prefetch(cands) if k in self._demoted] if cands else []
        done = []
        for key in wanted:
            with self._lock:
                share = self._demoted.get(key)
            if share is None or key in self._taken:
                continue
            lease = store.acquire(key)
            if lease is None or lease.num_tokens == 0:
                if lease is not None:
                    lease.release()
                with self._lock:
                    self._demoted.pop(key, None)
                continue
            with lease:
                res = _resident_from(lease, share[0], share[1], self.config.headroom, self.device)
            with self._lock:
                if key in self._resident or key in self._taken or not self._room_for_locked(key, res.nbytes):
                    continue
                self._demoted.pop(key, None)
                self._resident[key] = res
                self._wanted[key] = res.num_layers
                self.policy.touch(key, time.time())
                self.counters["prefetched"] += 1
                done.append(key)
        return done

    def job_started(self, key: EntryKey) -> None:
        with self._lock:
            self.policy.start(key, time.time())

    def clear(self) -> None:
        """Release every resident page (at shutdown: a restarted process starts with an empty tier)."""
        with self._lock:
            for key in list(self._resident):
                self._drop_locked(key)

    def resident_layers(self, key: EntryKey) -> int:
        with self._lock:
            res = self._resident.get(key)
            return 0 if res is None else res.num_layers

    def stats(self) -> dict:
        """hits_full (every layer resident), hits_partial, misses, bytes_not_copied (history K/V a turn
        did not copy thanks to residency), layers_shrunk, demotions (sessions that left whole),
        released_for_room, prefetched (brought back up for a queued job), used_bytes, capacity_bytes (the
        budget), entries, layers (resident, in all)."""
        with self._lock:
            return dict(self.counters, used_bytes=self._used_locked(), capacity_bytes=self.budget,
                        entries=len(self._resident), layers=sum(r.num_layers for r in self._resident.values()))

    # ---- internals ----------------------------------------------------------------------------
    def _used_locked(self) -> int:
        return sum(r.nbytes for r in self._resident.values())

    def _victim_locked(self, incoming: EntryKey | None) -> EntryKey:
        """The policy's choice; ``incoming`` itself only when it is alone (then it shrinks too)."""
        cands = [k for k in self._resident if k != incoming] or list(self._resident)
        # The device tier's victims go down to DRAM, as DRAM's go down to disk: the policy's "dram" rule.
        key = self.policy.victim("dram", cands)
        return key if key in self._resident else cands[0]

    def _room_for_locked(self, incoming: EntryKey, nbytes: int) -> bool:
        """Demote sessions the policy values less than ``incoming`` until ``nbytes`` more fit; False if
        that is not enough (then nothing was demoted)."""
        free, victims = self.budget - self._used_locked(), []
        cands = set(self._resident)
        while free < nbytes and cands:
            key = self.policy.victim("dram", cands, incoming=incoming)
            if key not in cands:
                return False
            victims.append(key)
            cands.discard(key)
            free += self._resident[key].nbytes
        if free < nbytes:
            return False
        for key in victims:
            self._demote_locked(key)
        return True

    def _within_budget_locked(self, incoming: EntryKey) -> None:
        while self._resident and self._used_locked() > self.budget:
            key = self._victim_locked(incoming)
            res = self._resident[key]
            if res.num_layers > 1:            # shrink before leaving whole: the last layers stream cheapest
                res.trim_layers(res.num_layers - 1)
                self.counters["layers_shrunk"] += 1
            else:
                self._demote_locked(key)

    def _demote_locked(self, key: EntryKey) -> None:
        res = self._resident[key]
        self._demoted[key] = (self._wanted.get(key, res.num_layers), res.page_size)
        self._drop_locked(key)
        self.counters["demotions"] += 1

    def _drop_locked(self, key: EntryKey) -> None:
        self._resident.pop(key, None)
        self._wanted.pop(key, None)
        self.policy.forget(key)
