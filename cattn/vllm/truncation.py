"""Finding a truncated conversation in a stored one: a prompt that equals the stored tokens on a
prefix (the system prompt, typically) and then continues with tokens the stored session holds further
on (the oldest messages were dropped).

The split is the longest common prefix ``at``: tokens ``[0, at)`` are loaded where they were
computed, unshifted; prompt tokens from ``at`` on are stored tokens from ``at + shift`` on, and the
shift chosen is the one whose span is longest. (Where a dropped message begins with the same tokens
as the first kept one, e.g. a chat template's role header, those tokens are taken from the dropped
message's copy at their own positions: the same token ids, computed in a context one message longer.)
"""
from __future__ import annotations

from dataclasses import dataclass

from cattn.store.contract import common_prefix


@dataclass(frozen=True)
class Shift:
    """Prompt tokens ``[0, at)`` are stored tokens ``[0, at)``; prompt tokens ``[at, at + length)`` are
    stored tokens ``[at + by, at + by + length)``."""

    at: int
    by: int
    length: int

    @property
    def stored_end(self) -> int:
        """Stored tokens a load reads, ``[0, stored_end)``."""
        return self.at + self.by + self.length


def find_shift(stored: list[int], prompt: list[int], min_length: int = 1) -> Shift | None:
    """The longest span of ``prompt`` after its common prefix with ``stored`` that ``stored`` holds
    further on, or None if none reaches ``min_length`` tokens. Ties go to the smallest shift."""
    if min_length < 1:
        raise ValueError(f"min_length must be at least 1, got {min_length}")
    at = common_prefix(stored, prompt)
    if at >= len(prompt) or at >= len(stored):
        return None
    rest, first, best = prompt[at:], prompt[at], None
    for j in range(at + 1, len(stored) - min_length + 1):
        if stored[j] != first:
            continue
        n = common_prefix(stored[j:j + len(rest)], rest)
        if n >= min_length and (best is None or n > best.length):
            best = Shift(at, j - at, n)
            if n == len(rest):
                break
    return best
