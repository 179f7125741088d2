"""`TieredStore`'s arguments, checked before anything is built: a bad one is a ValueError or TypeError
naming it, and the store releases the lower tier it was given."""
from __future__ import annotations

import math

from cattn.store.kvformat.codec import check_format
from cattn.store.policy.base import Policy


def check_arguments(dram_bytes, policy, high_watermark, low_watermark, io_threads, full_timeout_s,
                    disk_read_bytes_per_s, partial_prefetch, max_chunk_tokens, kv_format) -> None:
    """Raise for the first bad one of `TieredStore`'s arguments (their meaning: its docstring)."""
    if not isinstance(dram_bytes, int) or isinstance(dram_bytes, bool) or dram_bytes <= 0:
        raise ValueError(f"dram_bytes must be a positive int, got {dram_bytes!r}")
    if policy is not None and not isinstance(policy, Policy):
        raise TypeError(f"policy must be a cattn.store.policy.base.Policy, got {type(policy).__name__}")
    if not all(isinstance(w, (int, float)) for w in (high_watermark, low_watermark)) \
            or not 0 < low_watermark <= high_watermark <= 1:
        raise ValueError(f"need 0 < low_watermark <= high_watermark <= 1, got {low_watermark!r}, {high_watermark!r}")
    if not isinstance(io_threads, int) or io_threads < 1:
        raise ValueError(f"io_threads must be an int >= 1, got {io_threads!r}")
    if not isinstance(full_timeout_s, (int, float)) or not 0 <= full_timeout_s < math.inf:
        raise ValueError(f"full_timeout_s must be a number >= 0, got {full_timeout_s!r}")
    if disk_read_bytes_per_s is not None and not (0 < disk_read_bytes_per_s < math.inf):
        raise ValueError(f"disk_read_bytes_per_s must be a positive number or None, got {disk_read_bytes_per_s!r}")
    if not isinstance(partial_prefetch, bool):
        raise TypeError(f"partial_prefetch must be a bool, got {partial_prefetch!r}")
    if max_chunk_tokens is not None and (not isinstance(max_chunk_tokens, int) or isinstance(max_chunk_tokens, bool)
                                         or max_chunk_tokens < 1):
        raise ValueError(f"max_chunk_tokens must be an int >= 1 or None, got {max_chunk_tokens!r}")
    check_format(kv_format)
