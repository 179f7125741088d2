"""The ``value`` policy: keep the histories worth the most GPU time per byte, online.

A history is worth keeping by how likely its session is to come back, what its reuse then saves,
and the bytes it holds. None of it is known in advance; the policy estimates it from what the
tiers and the queue report:

- **Will it return?** Per turn count k (how many turns the session has had), the share of
  sessions that went on from k turns to k + 1 (``p_k``; most conversations are single-turn, and a
  session that came back once is far likelier to come back again), and the distribution of the
  gaps between turns seen so far (survival ``S``). A session idle for ``t`` returns with
  probability ``p_k S(t) / (1 - p_k + p_k S(t))``; with ``own_gaps``, ``t`` is first scaled by the
  population's median gap over the session's own mean gap (a fast typist's silence means more).
  Three more directions are built and measured but off by default (no gain on the long-context
  workload, docs/replay.md): ranking DRAM by the rate of return now (``hazard``) or by the
  probability of returning within a horizon (``horizon_s``), and bringing up, when the disk is
  idle, sessions likelier to come now than one in DRAM (``speculative``).
- **DRAM admission** (``first_turns_first``): in DRAM, a session that has had one turn leaves
  before any that has had more (most conversations have one turn; one that came back is worth
  the room more than the estimate alone says, measured on every seed and disk size).
- **Value per byte**: with ``value_per_byte`` and the session's size known (`Policy.sized`), the
  GPU time its reuse saves per byte: prefilling ``h`` history tokens again costs ``2 params h (1 +
  h / h0)`` FLOPs (matmuls, then attention; ``h0 = params / (layers x heads x head_dim)`` =
  ``crossover_tokens``), so a long history saves more per byte than a short one.

Queued sessions are ranked as the scheduler-aware policy ranks them (a queued job's history is
kept, the furthest back goes first); the estimate orders the sessions with no queued job, in
DRAM (demotion) and, with ``disk_return``, on disk (drop), where the scheduler uses recency.
"""
from __future__ import annotations

import bisect
import math
from collections import OrderedDict, defaultdict, deque
from dataclasses import dataclass

from cattn.store.policy.base import Scheduler, as_set, check_tier


@dataclass
class ValueConfig:
    """Attributes (each a direction that can be switched off for an ablation):
        dram_return: order DRAM demotions by the return estimate (else least recently used).
        disk_return: order disk drops by the return estimate (else least recently used).
        hazard: (measured, off: it lost, docs/replay.md) in DRAM, rank by the rate of return now (probability per second of the next turn
            arriving, given the idle time) instead of the probability of ever returning: DRAM holds
            the sessions whose turn is likeliest to come next, not those just saved.
        prefetch_queued: prefetch the queued jobs' histories from disk, as the scheduler-aware policy
            does (off: the disk is left to the jobs' own reads at their start).
        speculative: (measured, off: no gain) when the disk is idle, bring up sessions with no queued job whose rate of
            return now is higher than that of a session in DRAM (which it then replaces).
        own_gaps: (measured, off: no gain) scale a session's idle time by its own gaps.
        first_turns_first: in DRAM, sessions off the queue that have had one turn leave before any that
            has had more, whatever the estimate says (DRAM admission: a first turn, likely a
            conversation's only one, never displaces a conversation that already came back).
        horizon_s: (measured, off: no gain) rank by the probability of returning within this many seconds
            from now instead of at all: DRAM holds a session for about a minute, and a session idle
            far past the median gap is less likely to come back soon than ever. None: at all.
        value_per_byte: weigh by GPU time saved per byte (needs `Policy.sized` and ``bytes_per_token``).
        bytes_per_token: KV bytes of one token (the model's); 0: unknown, sizes are not used.
        crossover_tokens: h0 above: params / (layers x query heads x head_dim) of the model.
        gap_samples: how many recent gaps the survival estimate keeps.
        max_turn_class: turn counts above this share one estimate.
    """

    dram_return: bool = True
    disk_return: bool = True
    hazard: bool = False
    speculative: bool = False
    prefetch_queued: bool = True
    own_gaps: bool = False
    first_turns_first: bool = True
    horizon_s: float | None = None
    value_per_byte: bool = True
    bytes_per_token: int = 0
    crossover_tokens: float = 60_000.0
    gap_samples: int = 4096
    max_turn_class: int = 4

    def __post_init__(self):
        if isinstance(self.bytes_per_token, bool) or not isinstance(self.bytes_per_token, int) \
                or self.bytes_per_token < 0:
            raise ValueError(f"bytes_per_token must be an int >= 0, got {self.bytes_per_token!r}")
        if self.horizon_s is not None and (isinstance(self.horizon_s, bool) or not isinstance(self.horizon_s, (int, float))
                                           or not 0 < self.horizon_s < math.inf):
            raise ValueError(f"horizon_s must be a positive number of seconds or None, got {self.horizon_s!r}")
        if not self.crossover_tokens > 0:
            raise ValueError(f"crossover_tokens must be > 0, got {self.crossover_tokens!r}")
        for name in ("gap_samples", "max_turn_class"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")


class ValuePolicy(Scheduler):
    """The scheduler-aware policy with sessions off the queue ordered by estimated value per byte."""

    name = "value"

    def __init__(self, config: ValueConfig | None = None, ttl: float | None = None):
        super().__init__(ttl=ttl)
        self.config = config or ValueConfig()
        self._now = 0.0
        self._turns: dict = defaultdict(int)           # key -> turns started
        self._reached: dict[int, int] = defaultdict(int)  # k -> sessions that started a k-th turn
        self._last_save: dict = {}                      # key -> when its history was last saved
        self._gap_sum: dict = defaultdict(float)        # key -> sum of its own gaps
        self._sizes: dict = {}
        self._gaps: deque[float] = deque()              # recent gaps, arrival order
        self._sorted_gaps: list[float] = []
        self._by_class: dict[int, OrderedDict] = defaultdict(OrderedDict)  # turn class -> keys, oldest first
        self._save_times: dict[int, list[tuple[float, int, object]]] = defaultdict(list)  # class -> saves, in time
        self._save_seq = 0
        self._peak: tuple[int, float] | None = None  # (gaps seen, idle time of the peak return rate)

    # ---- what the tiers and the queue report

    def _class(self, key) -> int:
        return min(self._turns.get(key, 0), self.config.max_turn_class)

    def touch(self, key, now):
        super().touch(key, now)
        self._now = max(self._now, now)
        self._last_save[key] = now
        order = self._by_class[self._class(key)]
        order[key] = None
        order.move_to_end(key)
        self._save_seq += 1
        self._save_times[self._class(key)].append((now, self._save_seq, key))

    def forget(self, key):
        super().forget(key)
        self._by_class[self._class(key)].pop(key, None)
        self._sizes.pop(key, None)

    def sized(self, key, nbytes: int) -> None:
        self._sizes[key] = nbytes

    def last_saved(self, key) -> float | None:
        """When ``key``'s history was last saved (its last `touch`), or None if never."""
        return self._last_save.get(key)

    def size(self, key) -> int | None:
        """The bytes of ``key``'s history, as the store last said (`sized`), or None if never."""
        return self._sizes.get(key)

    def start(self, key, now):
        super().start(key, now)
        self._now = max(self._now, now)
        cls = self._class(key)
        self._by_class[cls].pop(key, None)
        if key in self._last_save:
            gap = max(0.0, now - self._last_save[key])
            self._gap_sum[key] += gap
            self._gaps.append(gap)
            bisect.insort(self._sorted_gaps, gap)
            if len(self._gaps) > self.config.gap_samples:
                old = self._gaps.popleft()
                del self._sorted_gaps[bisect.bisect_left(self._sorted_gaps, old)]
        self._turns[key] += 1
        self._reached[self._turns[key]] += 1

    # ---- the estimate

    def survival(self, idle: float) -> float:
        """Share of the gaps seen so far longer than ``idle`` seconds (one more assumed: never 0)."""
        gaps = self._sorted_gaps
        return (len(gaps) - bisect.bisect_right(gaps, idle) + 1) / (len(gaps) + 1)

    def return_probability(self, key, now: float | None = None) -> float:
        """Estimated probability that ``key``'s session has another turn (with ``horizon_s``: within that
        many seconds from now), given its turns and idle time."""
        now = self._now if now is None else now
        k = max(1, self._turns.get(key, 0))
        p = (self._reached.get(k + 1, 0) + 1) / (self._reached.get(k, 0) + 2)  # Laplace: 1/2 with no data
        if not self._sorted_gaps:
            return p
        idle = self._idle(key, now)
        survive = self.survival(idle)
        soon = survive - self.survival(idle + self.config.horizon_s) if self.config.horizon_s else survive
        return p * soon / (1 - p + p * survive)

    def _idle(self, key, now: float) -> float:
        idle = max(0.0, now - self._last_save.get(key, now))
        own = self._turns.get(key, 0) - 1
        if self.config.own_gaps and own > 0 and self._gap_sum[key] > 0 and self._sorted_gaps:
            median = self._sorted_gaps[len(self._sorted_gaps) // 2]
            idle *= min(4.0, max(0.25, median / (self._gap_sum[key] / own)))
        return idle

    def return_rate(self, key, now: float | None = None) -> float:
        """Estimated probability per second that ``key``'s next turn arrives now (the hazard), given
        its turns and idle time: ``p_k f(t) / (1 - p_k + p_k S(t))`` with the gap density ``f`` from
        the gaps within a factor 1.5 of ``t``."""
        now = self._now if now is None else now
        gaps = self._sorted_gaps
        k = max(1, self._turns.get(key, 0))
        p = (self._reached.get(k + 1, 0) + 1) / (self._reached.get(k, 0) + 2)
        if not gaps:
            return p / 60.0
        t = max(1.0, self._idle(key, now))
        n = len(gaps) + 1
        inside = bisect.bisect_right(gaps, t * 1.5) - bisect.bisect_left(gaps, t / 1.5)
        density = (inside + 0.5) / (n * t * (1.5 - 1 / 1.5))
        survive = self.survival(t)
        return p * density / (1 - p + p * survive)

    def score(self, key, now: float | None = None, *, rate: bool = False) -> float:
        """Expected GPU time saved per byte, up to a constant: what keeping ``key`` is worth (``rate``:
        per second from now, the hazard; else over its next turn)."""
        value = self.return_rate(key, now) if rate else self.return_probability(key, now)
        if self.config.value_per_byte and self.config.bytes_per_token and key in self._sizes:
            tokens = self._sizes[key] / self.config.bytes_per_token
            value *= 1 + tokens / self.config.crossover_tokens
        return value

    # ---- choices

    def victim(self, tier, candidates, incoming=None):
        check_tier(tier)
        use = self.config.dram_return if tier == "dram" else self.config.disk_return
        if not use:
            return super().victim(tier, candidates, incoming)
        cands = as_set(candidates)
        if not cands:
            return None
        floor = -1.0 if incoming is None else self._distance(incoming)
        if tier == "disk" and incoming is None:
            # the least valuable outside the eviction window; within a turn class the value falls with
            # idle time, so the oldest few of each class hold it
            heads = []
            for order in self._by_class.values():
                taken = 0
                for k in order:
                    if k in cands and self._distance(k) >= self.eviction_window:
                        heads.append(k)
                        taken += 1
                        if taken == 8:
                            break
            if heads:
                return min(heads, key=self.score)
            if len(cands) > 4 * len(self._order) + 64:  # keys the policy was never told about
                return super().victim(tier, cands, incoming)
        rate = tier == "dram" and self.config.hazard
        first_last = tier == "dram" and self.config.first_turns_first

        def order(k):  # the largest leaves first
            d = self._distance(k)
            if not math.isinf(d):
                return d, False, -self._recency(k)
            return d, first_last and self._turns.get(k, 0) <= 1, -self.score(k, rate=rate)

        key = max(cands, key=order)
        if incoming is not None and math.isinf(floor):
            # a speculative read: only for a session clearly likelier to come now than the one it replaces
            if not math.isinf(self._distance(key)):
                return None
            return key if self.score(key, rate=rate) * 1.5 < self.score(incoming, rate=rate) else None
        return key if self._distance(key) > floor else None

    def prefetch(self, on_disk):
        wanted = super().prefetch(on_disk) if self.config.prefetch_queued else []
        if not self.config.speculative:
            return wanted
        on_disk = as_set(on_disk)
        # per turn class, the sessions saved around the idle time where the return rate peaks
        cands = []
        for cls, saves in self._save_times.items():
            if len(saves) > 4 * (len(self._by_class[cls]) + 64):  # drop stale entries now and then
                saves[:] = [e for e in saves if self._last_save.get(e[2]) == e[0] and e[2] in self._by_class[cls]]
            peak = self._peak_idle()
            i = bisect.bisect_left(saves, (self._now - peak, -1, None))
            for now_t, _, k in saves[max(0, i - 8):i + 8]:
                if k in on_disk and self._last_save.get(k) == now_t and self._distance(k) == math.inf:
                    cands.append(k)
        cands.sort(key=lambda k: -self.score(k, rate=True))
        return wanted + [k for k in cands[:4] if k not in wanted]

    def _peak_idle(self) -> float:
        """Idle time at which the population's return rate is highest (recomputed every 64 gaps)."""
        gaps = self._sorted_gaps
        if len(gaps) < 16:
            return 60.0
        if self._peak is not None and self._peak[0] // 64 == len(self._gaps) // 64:
            return self._peak[1]
        best, best_t, t = -1.0, 60.0, max(1.0, gaps[0])
        while t <= gaps[-1]:
            inside = bisect.bisect_right(gaps, t * 1.5) - bisect.bisect_left(gaps, t / 1.5)
            survive = len(gaps) - bisect.bisect_right(gaps, t) + 1
            if inside / (t * survive) > best:
                best, best_t = inside / (t * survive), t
            t *= 1.25
        self._peak = (len(self._gaps), best_t)
        return best_t
