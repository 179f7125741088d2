"""A seeded long-context workload shaped like a production trace of long multi-turn conversations.

The shape it matches (the one known of that trace): about 12,000 requests over an hour, mean
prompt about 12K tokens and up to about 126K, a shared system prompt at the start of every
request, three quarters of conversations single-turn, a median of about two minutes between a
conversation's turns (p90 about eight). `LongContextConfig` documents how each is drawn; the
defaults give (seed 0) 12,0xx requests in 3,600 s, mean prompt 12.0K, max 126K, 75% single-turn,
gaps with median 2.0 and p90 8.0 minutes (`tests/replay/test_workload.py` checks the shape).

A prompt is the whole conversation so far: system prompt, earlier messages and answers, and the
new message. A trace `Job` carries only the new part (``new_tokens``; the first turn's includes
the system prompt), so a session's prompts grow turn by turn as the replay adds them up.
"""
from __future__ import annotations

import math
import random
from dataclasses import dataclass, fields

from cattn.replay.queue import Job
from cattn.replay.records import number_turns


@dataclass
class LongContextConfig:
    """Attributes:
        duration_s: length of the trace; sessions start as a Poisson process over it, and turns
            that would arrive after it are not in the trace.
        session_rate: new conversations per second (about 7,900 in an hour: 12,000 requests).
        single_turn: share of conversations drawn with one turn (a few more look single-turn in
            the trace: their next turn falls after its end).
        extra_turns_mean: turns beyond the second of a multi-turn conversation (geometric mean).
        system_tokens: the shared system prompt at the start of every request.
        first_mean, first_sigma: lognormal tokens of a conversation's first user message (documents,
            code, pasted context: the long part).
        next_mean, next_sigma: lognormal tokens of a later user message.
        output_mean, output_sigma: lognormal tokens of an answer.
        gap_median_s, gap_p90_s: lognormal time between two turns of a conversation (drawn a bit
            longer than the trace shows: the end of the trace cuts the longest gaps).
        max_prompt: a prompt is clipped to this (the longest prompts of the trace, ~126K); a turn
            that would exceed it ends its conversation.
        seed: everything is drawn from this.
    """

    duration_s: float = 3600.0
    session_rate: float = 2.2
    single_turn: float = 0.73
    extra_turns_mean: float = 1.4
    system_tokens: int = 1536
    first_mean: float = 9400.0
    first_sigma: float = 1.25
    next_mean: float = 1200.0
    next_sigma: float = 1.2
    output_mean: float = 400.0
    output_sigma: float = 0.7
    gap_median_s: float = 130.0
    gap_p90_s: float = 560.0
    max_prompt: int = 126_000
    seed: int = 0

    def __post_init__(self):
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name == "seed":
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"{f.name} must be a finite number, got {value!r}")
            if f.name == "single_turn":
                if not 0 <= value <= 1:
                    raise ValueError(f"single_turn must be in [0, 1], got {value!r}")
            elif f.name in ("extra_turns_mean", "system_tokens"):
                if value < 0:
                    raise ValueError(f"{f.name} must be >= 0, got {value!r}")
            elif not value > 0:
                raise ValueError(f"{f.name} must be > 0, got {value!r}")
        if not self.gap_p90_s > self.gap_median_s:
            raise ValueError(f"gap_p90_s ({self.gap_p90_s}) must exceed gap_median_s ({self.gap_median_s})")


def _lognormal(rng: random.Random, mean: float, sigma: float) -> int:
    return max(1, round(rng.lognormvariate(math.log(mean) - sigma * sigma / 2, sigma)))


def long_context_trace(cfg: LongContextConfig | None = None) -> list[Job]:
    """The trace, in serving order (sessions ``L0``, ``L1``, ...)."""
    cfg = cfg or LongContextConfig()
    rng = random.Random(cfg.seed)
    gap_mu, gap_sigma = math.log(cfg.gap_median_s), math.log(cfg.gap_p90_s / cfg.gap_median_s) / 1.2815516
    jobs, t, i = [], rng.expovariate(cfg.session_rate), 0
    while t < cfg.duration_s:
        turns = 1 if rng.random() < cfg.single_turn else 2 + _geometric(rng, cfg.extra_turns_mean)
        prompt, arrival = 0, t
        for k in range(turns):
            new = _lognormal(rng, cfg.first_mean, cfg.first_sigma) + cfg.system_tokens if k == 0 \
                else _lognormal(rng, cfg.next_mean, cfg.next_sigma)
            if prompt + new > cfg.max_prompt:
                if k:
                    break  # the conversation outgrew the context window: it ends here
                new = cfg.max_prompt
            out = _lognormal(rng, cfg.output_mean, cfg.output_sigma)
            if arrival >= cfg.duration_s:
                break  # the trace ends: later turns are not in it
            jobs.append(Job(f"L{i}", arrival, new, out))
            prompt += new + out
            arrival += rng.lognormvariate(gap_mu, gap_sigma)
        i += 1
        t += rng.expovariate(cfg.session_rate)
    return number_turns(jobs)


def _geometric(rng: random.Random, mean: float) -> int:
    """0, 1, 2, ... with the given mean."""
    if mean <= 0:
        return 0
    p = 1 / (1 + mean)
    return int(math.log(1 - rng.random()) / math.log(1 - p))


def prompt_lengths(jobs: list[Job]) -> list[int]:
    """Each turn's whole prompt (history + new), untruncated."""
    seen: dict[str, int] = {}
    out = []
    for j in jobs:
        history = seen.get(j.session, 0)
        out.append(history + j.new_tokens)
        seen[j.session] = history + j.new_tokens + j.output_tokens
    return out
