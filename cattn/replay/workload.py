"""Multi-turn workloads: a seeded synthetic generator shaped like ShareGPT, and the timing
that turns a list of conversations (synthetic or real) into a trace.

Timing model (open loop): sessions start at the arrivals of a Poisson or a bursty
gamma renewal process; each later turn of a session arrives a think time after
the previous one (exponential, mean `think_mean`). The paper does not report
think times; it is a parameter. Arrival times fix the serving order (first come,
first served), so every policy sees the same order of jobs.
"""
from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass

from cattn.replay.queue import Job
from cattn.replay.records import number_turns

# A conversation as the replay needs it: (user tokens, assistant tokens) per turn.
Conversation = Sequence[tuple[int, int]]


@dataclass
class ArrivalConfig:
    """When sessions and their turns arrive.

    Attributes:
        rate: new sessions per second (mean).
        process: ``"poisson"`` or ``"gamma"`` (bursty renewal process).
        burstiness: for ``gamma``, the coefficient of variation of inter-arrival gaps (1 = Poisson).
        think_mean: mean seconds between two turns of a session (exponential).
        seed: seed of the arrival times.
    """

    rate: float = 1.0
    process: str = "poisson"
    burstiness: float = 2.0
    think_mean: float = 60.0
    seed: int = 0

    def __post_init__(self):
        if self.process not in ("poisson", "gamma"):
            raise ValueError(f"process must be 'poisson' or 'gamma', got {self.process!r}")
        for name in ("rate", "burstiness"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)!r}")
        if not self.think_mean >= 0:
            raise ValueError(f"think_mean must be >= 0, got {self.think_mean!r}")


@dataclass
class SyntheticConfig:
    """ShareGPT-shaped conversations. Means follow the paper's ShareGPT figures; the spreads
    match the medians of the recovered dataset (user 18 tokens, assistant 273; docs/replay.md).

    Attributes:
        num_sessions: conversations to generate.
        turns_mean, turns_dispersion: turns per session = 1 + negative binomial with this mean
            (minus one) and shape; the defaults give mean 3.5, median 3, p90 7, p99 13.
        user_mean, user_sigma: lognormal user-message tokens (mean, sigma of the log).
        output_mean, output_sigma: lognormal assistant-answer tokens.
        max_tokens: cap on any one message (a long paste or answer is clipped).
        seed: seed of the conversation shapes.
    """

    num_sessions: int = 2000
    turns_mean: float = 3.5
    turns_dispersion: float = 1.2
    user_mean: float = 95.0
    user_sigma: float = 1.8
    output_mean: float = 350.0
    output_sigma: float = 0.5
    max_tokens: int = 4096
    seed: int = 0

    def __post_init__(self):
        if not isinstance(self.num_sessions, int) or self.num_sessions < 1:
            raise ValueError(f"num_sessions must be an int >= 1, got {self.num_sessions!r}")
        if not self.turns_mean >= 1:
            raise ValueError(f"turns_mean must be >= 1, got {self.turns_mean!r}")
        for name in ("turns_dispersion", "user_mean", "output_mean", "user_sigma", "output_sigma"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)!r}")
        if not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise ValueError(f"max_tokens must be an int >= 1, got {self.max_tokens!r}")


def _poisson(rng: random.Random, lam: float) -> int:
    # counting exponential gaps inside [0, lam): exact, and lam stays small here
    n, t = 0, rng.expovariate(1.0)
    while t < lam:
        n += 1
        t += rng.expovariate(1.0)
    return n


def _lognormal(rng: random.Random, mean: float, sigma: float, cap: int) -> int:
    return min(cap, max(1, round(rng.lognormvariate(math.log(mean) - sigma * sigma / 2, sigma))))


def synthetic_conversations(cfg: SyntheticConfig) -> list[list[tuple[int, int]]]:
    """``cfg.num_sessions`` conversations, each a list of (user tokens, assistant tokens)."""
    rng = random.Random(cfg.seed)
    extra_mean = cfg.turns_mean - 1
    convs = []
    for _ in range(cfg.num_sessions):
        # negative binomial as a gamma-Poisson mixture
        extra = _poisson(rng, rng.gammavariate(cfg.turns_dispersion, extra_mean / cfg.turns_dispersion)) \
            if extra_mean > 0 else 0
        convs.append([(_lognormal(rng, cfg.user_mean, cfg.user_sigma, cfg.max_tokens),
                       _lognormal(rng, cfg.output_mean, cfg.output_sigma, cfg.max_tokens))
                      for _ in range(1 + extra)])
    return convs


def schedule(conversations: Sequence[Conversation], arrivals: ArrivalConfig,
             names: Sequence[str] | None = None) -> list[Job]:
    """Place conversations in time: the trace, in serving order.

    Args:
        conversations: per session, its turns as (user tokens, assistant tokens).
        arrivals: session arrival process and think time.
        names: session ids (default ``s0``, ``s1``, ...).
    """
    if names is not None and len(names) != len(conversations):
        raise ValueError(f"names has {len(names)} entries for {len(conversations)} conversations")
    rng = random.Random(arrivals.seed)
    shape = 1.0 / arrivals.burstiness ** 2
    jobs, start = [], 0.0
    for i, conv in enumerate(conversations):
        if i:
            start += (rng.expovariate(arrivals.rate) if arrivals.process == "poisson"
                      else rng.gammavariate(shape, 1.0 / (arrivals.rate * shape)))
        t = start
        for k, (user, out) in enumerate(conv):
            if k and arrivals.think_mean > 0:
                t += rng.expovariate(1.0 / arrivals.think_mean)
            jobs.append(Job(names[i] if names is not None else f"s{i}", t, int(user), int(out)))
    return number_turns(jobs)
