"""Told policies: the ``value`` policy given part of the future, to measure what its online estimate
cannot know. Diagnostics for docs/replay.md ("What is left to the bound"): they read the trace, so
they are bounds to compare with, never policies to serve with, and `make_policy` does not offer them.

- ``odds``: told, per turn count k, the share of the trace's sessions with k turns that have another
  (in hindsight, instead of the running estimate); the timing stays the online estimate.
- ``which``: told which sessions have another turn in the trace, not when. The return probability
  is 0 for a session with no turn left; among the others, the online estimate of the timing ranks
  them (the share of the gaps seen so far that end within the next ``horizon_s``, given the idle time).
- ``when``: told when each session's next turn arrives; the sooner, the more it is worth.

Everything else (the queue look-ahead, value per byte, the tiers' mechanics) is the ``value``
policy's, but for ``first_turns_first``, which ``which`` and ``when`` leave off: what they are told decides. The
gap between a told row and the online one is what knowing that part is worth.
"""
from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import replace

from cattn.replay.queue import Job
from cattn.store.policy.value import ValueConfig, ValuePolicy

TOLD = ("odds", "which", "when")


class ToldValuePolicy(ValuePolicy):
    """The ``value`` policy told ``told`` (one of `TOLD`) about ``jobs``, the trace it replays."""

    def __init__(self, jobs: Sequence[Job], told: str, config: ValueConfig | None = None, horizon_s: float = 60.0):
        if told not in TOLD:
            raise ValueError(f"told must be one of {TOLD}, got {told!r}")
        if isinstance(horizon_s, bool) or not isinstance(horizon_s, (int, float)) or not horizon_s > 0:
            raise ValueError(f"horizon_s must be a positive number of seconds, got {horizon_s!r}")
        # knowing which sessions come back supersedes the rule that a first turn leaves DRAM first (the rule
        # stands in for not knowing it); told only the odds, the policy keeps it
        config = config or ValueConfig()
        super().__init__(config if told == "odds" else replace(config, first_turns_first=False))
        self.told, self.horizon_s = told, float(horizon_s)
        self.name = f"value told {told}"
        self._arrivals: dict[str, list[float]] = defaultdict(list)  # session -> its turns' arrivals, in order
        for job in jobs:
            self._arrivals[job.session].append(job.arrival)
        self._trace_reached: Counter = Counter()  # k -> sessions of the trace with at least k turns
        for arrivals in self._arrivals.values():
            self._trace_reached.update(range(1, len(arrivals) + 1))

    def return_probability(self, key, now: float | None = None) -> float:
        now = self._now if now is None else now
        started = self._turns.get(key, 0)
        survive = self.survival(self._idle(key, now))
        if self.told == "odds":  # as the online estimate, with the whole trace's shares of sessions going on
            k = max(1, started)
            p = self._trace_reached[k + 1] / self._trace_reached[k] if self._trace_reached[k] else 0.0
            return p * survive / (1 - p + p * survive)
        arrivals = self._arrivals.get(key, ())
        if started >= len(arrivals):
            return 0.0  # its last turn in the trace has run
        if self.told == "when":
            return 1.0 / max(1.0, arrivals[started] - now)
        return 1e-9 + (survive - self.survival(self._idle(key, now) + self.horizon_s)) / survive
