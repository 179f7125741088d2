"""A worker's shifted load: stored blocks at their original positions -> tokens -> keys re-rotated
-> the request's blocks at the new positions (docs/vllm.md, "Truncation").

The store holds a block as vLLM's ``[H, N, C]`` view hands it over, row ``r`` of block ``b`` as
stored "token" ``b*N + r``; so stored tokens ``[lo, hi)`` (whole blocks) are put back into blocks
``[(hi - lo) / N, H, N, C]``, decoded by the backend's `BlockLayout`, and the destination blocks
are built whole (a shift that is not a multiple of N moves tokens across blocks).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from cattn.rope import RopeSpec
from cattn.vllm.jobs import LoadJob
from cattn.vllm.shift import relocate, shift_angles


@dataclass
class ShiftedCopy:
    """Where the tokens of one shifted `LoadJob` come from and go to (the same for every layer).

    Attributes:
        lo, hi: stored tokens read, ``[lo, hi)``, whole blocks.
        index: ``[T]`` int64, destination token ``start + j`` is stored token ``lo + index[j]``.
        rotate_from: destination tokens ``[start + rotate_from, ...)`` are shifted.
        cos, sin: ``[T - rotate_from, rotary_dim // 2]`` float32, their rotation.
        blocks: ``[T / N]`` int64, the request's destination block ids.
    """

    lo: int
    hi: int
    index: torch.Tensor
    rotate_from: int
    cos: torch.Tensor
    sin: torch.Tensor
    blocks: torch.Tensor


def stored_tokens_needed(job: LoadJob, block_size: int) -> int:
    """How many stored tokens (from 0, whole blocks) a shifted job reads."""
    return -(-(job.num_tokens + job.shift) // block_size) * block_size


def tokens_match(job: LoadJob, stored: torch.Tensor) -> bool:
    """Whether ``stored [>= num_tokens + shift]`` int64 holds the job's tokens where the shift says."""
    want = torch.tensor(job.token_ids, dtype=torch.int64)
    at, end = job.shift_at, job.num_tokens
    return (stored.numel() >= end + job.shift and torch.equal(stored[:at], want[:at])
            and torch.equal(stored[at + job.shift:end + job.shift], want[at:]))


def plan_copy(job: LoadJob, rope: RopeSpec, block_size: int) -> ShiftedCopy:
    """The copy of destination tokens ``[job.start, job.num_tokens)`` (whole blocks)."""
    n, start, end = block_size, job.start, job.num_tokens
    if start % n or end % n:
        raise ValueError(f"a shifted load moves whole destination blocks: start {start}, end {end}, block {n}")
    dst = torch.arange(start, end)
    src = torch.where(dst < job.shift_at, dst, dst + job.shift)
    lo, hi = int(src.min()) // n * n, (int(src.max()) // n + 1) * n
    rotate_from = max(job.shift_at - start, 0)
    cos, sin = shift_angles(rope, src[rotate_from:], dst[rotate_from:])
    blocks = torch.tensor(job.block_ids, dtype=torch.int64)[start // n:end // n]
    return ShiftedCopy(lo, hi, src - lo, rotate_from, cos, sin, blocks)


def copy_layer(layer: torch.Tensor, lease, layer_idx: int, copy: ShiftedCopy, layout, rope: RopeSpec) -> None:
    """Write one layer's destination blocks into ``layer [B, H, N, C]`` from the lease's stored
    segments (``k, v [layers, tokens, H, C/2]``)."""
    _, h, n, c = layer.shape
    rows = torch.empty(copy.hi - copy.lo, h, c, dtype=layer.dtype)
    for seg in lease.segments:
        lo, hi = max(seg.start, copy.lo), min(seg.start + seg.num_tokens, copy.hi)
        if lo < hi:
            part = slice(lo - seg.start, hi - seg.start)
            rows[lo - copy.lo:hi - copy.lo, :, :c // 2] = seg.k[layer_idx, part]
            rows[lo - copy.lo:hi - copy.lo, :, c // 2:] = seg.v[layer_idx, part]
    stored = rows.reshape(-1, n, h, c).permute(0, 2, 1, 3)          # [blocks, H, N, C], vLLM's view
    out = relocate(stored, layout, copy.index, copy.rotate_from, copy.cos, copy.sin, rope, n)
    layer[copy.blocks.to(layer.device)] = out.to(layer.device)
