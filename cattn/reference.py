"""The ops in plain torch: the oracle of every test (run it in float64), and ``backend="torch"``.
(On CPU, ``backend="auto"`` runs `cattn.cpu_attention`, built for speed, against this oracle.)

Everything is explicit here: pages are gathered with indexing, RoPE is applied
with `apply_rope`, GQA is a reshape, the causal mask is built from positions.
Inputs are assumed valid (`cattn.ops` checks them); shapes follow `cattn.ops`.
"""
from __future__ import annotations

import math

import torch
from einops import rearrange

from cattn.rope import RopeSpec


def apply_rope(x: torch.Tensor, positions: torch.Tensor, rope: RopeSpec) -> torch.Tensor:
    """Rotate ``x [T, H, D]`` at ``positions [T]``; returns a new tensor of x's dtype.

    Angles are ``position * inv_freq`` in fp32 (as HF computes them); the rotation
    itself runs in x's dtype promoted to at least fp32.
    """
    angles = positions.to(torch.float32)[:, None] * rope.inv_freq.to(x.device)[None, :]
    work = torch.promote_types(x.dtype, torch.float32)
    cos_sin = torch.cat((angles.to(work).cos(), angles.to(work).sin()), dim=-1) * rope.attention_scaling
    return rotate(x.to(work), cos_sin, rope).to(x.dtype)


def rotate(x: torch.Tensor, cos_sin: torch.Tensor, rope: RopeSpec, out: torch.Tensor | None = None) -> torch.Tensor:
    """``x [..., T, H, D]`` rotated by ``cos_sin [..., T, rotary_dim]`` (cos | sin, scaled; leading dims
    broadcast), in the dtype of their product; the rest of the head passes through. ``rope`` gives the pairing
    (``style``) and the rotary width. With ``out`` (any strides, x's shape) the result is written there.

    Each rotated value is ``x1 * cos - x2 * sin`` or ``x2 * cos + x1 * sin``, each product rounded, as HF's
    ``q * cos + rotate_half(q) * sin`` computes it."""
    half = rope.inv_freq.numel()
    rd = 2 * half
    cos, sin = cos_sin[..., None, :half], cos_sin[..., None, half:]
    if out is None:
        out = torch.empty(x.shape, dtype=torch.promote_types(x.dtype, cos_sin.dtype), device=x.device)
    pairs = (slice(0, half), slice(half, rd)) if rope.style == "neox" else (slice(0, rd, 2), slice(1, rd, 2))
    x1, x2 = x[..., pairs[0]], x[..., pairs[1]]
    torch.sub(x1 * cos, x2 * sin, out=out[..., pairs[0]])
    torch.add(x2 * cos, x1 * sin, out=out[..., pairs[1]])
    if rd < x.shape[-1]:
        out[..., rd:] = x[..., rd:]
    return out


def write_kv(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
             slot_mapping: torch.Tensor) -> None:
    """Scatter ``k, v [T, Hkv, D]`` into ``[num_pages, page_size, Hkv, D]`` caches; slot -1 skips a token."""
    keep = slot_mapping >= 0
    if not bool(keep.all()):
        k, v, slot_mapping = k[keep], v[keep], slot_mapping[keep]
    slots = slot_mapping.long()
    k_cache.view(-1, *k_cache.shape[2:]).index_copy_(0, slots, k.to(k_cache.dtype))
    v_cache.view(-1, *v_cache.shape[2:]).index_copy_(0, slots, v.to(v_cache.dtype))


def gather_kv(cache: torch.Tensor, pages: torch.Tensor, kv_len: int) -> torch.Tensor:
    """The first ``kv_len`` tokens of a sequence whose pages are ``pages``: ``[kv_len, Hkv, D]``."""
    page_size = cache.shape[1]
    used = pages[: math.ceil(kv_len / page_size)].long()
    return cache.index_select(0, used).flatten(0, 1)[:kv_len]   # ~100x faster than cache[used] on a pool view


def paged_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_table: torch.Tensor,
                    kv_lens: torch.Tensor, cu_seqlens_q: torch.Tensor, rope: RopeSpec | None, *,
                    sm_scale: float | None = None, causal: bool = True, sliding_window: int | None = None,
                    logit_softcap: float | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
    """Attention of pre-RoPE ``q [total_q, Hq, D]`` over pre-RoPE paged K/V; see `cattn.ops.paged_attention`.

    ``sliding_window``: query at position p sees keys at k with ``p - k < sliding_window`` only;
    ``logit_softcap``: scores become ``softcap * tanh(scores / softcap)`` before masking and softmax.
    Computes in q's dtype promoted to at least fp32 and returns q's dtype.
    """
    head_dim = q.shape[2]
    group = q.shape[1] // k_cache.shape[2]
    scale = sm_scale if sm_scale is not None else head_dim ** -0.5
    work = torch.promote_types(q.dtype, torch.float32)
    out = torch.empty_like(q) if out is None else out
    kv_lens_list, cu = kv_lens.tolist(), cu_seqlens_q.tolist()
    for b, kv_len in enumerate(kv_lens_list):
        q_start, q_end = cu[b], cu[b + 1]
        q_len = q_end - q_start
        if q_len == 0:
            continue
        k = gather_kv(k_cache, block_table[b], kv_len).to(work)
        v = gather_kv(v_cache, block_table[b], kv_len).to(work)
        qb = q[q_start:q_end].to(work)
        q_pos = torch.arange(kv_len - q_len, kv_len, device=q.device)
        k_pos = torch.arange(kv_len, device=q.device)
        if rope is not None:
            spec = rope.at_length(kv_len)
            qb, k = apply_rope(qb, q_pos, spec), apply_rope(k, k_pos, spec)
        # GQA as a reshape: the group's query heads become extra rows of their KV head
        qg = rearrange(qb, "q (h g) d -> h (g q) d", g=group)
        scores = qg @ rearrange(k, "k h d -> h d k") * scale                    # [Hkv, G*q_len, kv_len]
        if logit_softcap is not None:
            scores = logit_softcap * torch.tanh(scores / logit_softcap)
        hidden = torch.zeros(q_len, kv_len, dtype=torch.bool, device=q.device)
        if causal:                                                              # bottom-right aligned
            hidden |= k_pos[None, :] > q_pos[:, None]
        if sliding_window is not None:
            hidden |= q_pos[:, None] - k_pos[None, :] >= sliding_window
        if causal or sliding_window is not None:
            scores = scores.masked_fill(hidden.repeat(group, 1), float("-inf"))
        ob = scores.softmax(dim=-1) @ rearrange(v, "k h d -> h k d")
        ob = rearrange(ob, "h (g q) d -> q (h g) d", g=group)
        out[q_start:q_end] = ob.to(out.dtype)
    return out
