"""Decode on the CPU without re-reading the history: a working copy of one layer's keys, rotated, and values.

`cattn.cpu_attention.paged_attention` is stateless: every call gathers each sequence's K/V from the pages
and rotates all of its keys, ``O(kv_len)`` work per layer and token on top of the attention itself. A
`WorkingKV` keeps one layer's keys *after* RoPE and its values, contiguous, for a batch of sequences:

    k, v   [B, Hkv, capacity, D]   token i of row b at [b, :, i]  (k rotated at position i)

A step that follows the one it last saw appends its new tokens (rotated at their positions) and attends
with one SDPA call over ``[:, :, :max_kv_len]`` views: no gather, no re-rotation, no Python loop over the
rows. The pages stay the cache of record, keys pre-RoPE (truncation, the store and the device tier read
them); the working copy is a cache of the pages and is rebuilt from them, in one batched gather, whenever
it cannot be trusted: the caller's ``stamp`` changed (anything but a forward step touched the pages:
truncation, crop, loads, rows rebuilt), a row's length is not the one it expects, or a longrope row crossed
its switch (all of its keys change frequencies). A step whose every row is a prefill (``q_len == kv_len``)
attends over its own new K/V and keeps nothing, so a prefill's peak memory stays the pages' (the stock
model's cache); the copy is built by the next step, a decode or an extend.

Memory: ``2 * B * Hkv * capacity * D`` elements of the work dtype (q's promoted to at least fp32) per
layer, capacity the longest row plus ``HEADROOM`` tokens, grown by ``GROWTH``: about the pages' own bytes
again for an fp32 model (twice them for a 16-bit one), for as long as the caller keeps it.

Numerics: Q and K are rotated by `cattn.reference.rotate` from the cos/sin table (HF's own values), in the
work dtype; SDPA attends with GQA. Rows of different lengths, extends (bottom-right causal) and sliding
windows pass a boolean mask; keys past a row's length are zeros and masked.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from cattn import reference
from cattn.rope import RopeSpec
from cattn.rope_table import cos_sin_table

HEADROOM = 256      # tokens of room past the longest row when the copy is (re)built or grown
GROWTH = 1.5        # capacity grows at least by this factor, so appends are amortised O(1)


@dataclass(frozen=True)
class StepLens:
    """A step's lengths on the host (built once per step), and the index tensors of its padded layout.

    Queries are laid out ``[B, max_q_len]``, right-aligned: query ``j`` of row ``b`` (of ``q_lens[b]``) sits
    in column ``max_q_len - q_lens[b] + j`` and at position ``kv_lens[b] - q_lens[b] + j``; column ``t`` of
    row ``b`` is at position ``kv_lens[b] - max_q_len + t`` (negative: a padding column).

    Attributes:
        kv_lens, q_lens: per row, tokens cached (this step's included) and new.
        past: per row, ``kv_len - q_len``: the tokens before this step.
        max_q_len, max_kv_len: the longest of each.
        uniform: every row has the same ``q_len`` and ``kv_len`` (no padding in the layout).
        prefill: every row's tokens are all new (``kv_len == q_len``).
    """

    kv_lens: tuple[int, ...]
    q_lens: tuple[int, ...]
    past: tuple[int, ...]
    max_q_len: int
    max_kv_len: int
    uniform: bool
    prefill: bool

    @staticmethod
    def of(kv_lens, q_lens) -> StepLens:
        """From per-row ``kv_lens`` and ``q_lens`` (sequences of ints)."""
        kv_lens, q_lens = tuple(int(n) for n in kv_lens), tuple(int(n) for n in q_lens)
        past = tuple(n - q for n, q in zip(kv_lens, q_lens))
        return StepLens(kv_lens, q_lens, past, max(q_lens, default=0), max(kv_lens, default=0),
                        uniform=len(set(kv_lens)) <= 1 and len(set(q_lens)) <= 1, prefill=not any(past))

    @property
    def batch_size(self) -> int:
        return len(self.kv_lens)

    @functools.cached_property
    def tokens(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(rows, cols, pos)``, each ``[total_q] int64``: row, column and position of each new token (built
        on first use: a uniform step never needs them)."""
        rows = [b for b, q in enumerate(self.q_lens) for _ in range(q)]
        cols = [self.max_q_len - q + j for q in self.q_lens for j in range(q)]
        pos = [p + j for p, q in zip(self.past, self.q_lens) for j in range(q)]
        return tuple(torch.tensor(x, dtype=torch.long) for x in (rows, cols, pos))


def write_pages(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                slot_mapping: torch.Tensor) -> None:
    """`cattn.ops.write_kv` without its checks, for a caller that checked the step's slots once (the patched
    model, at layer 0): ``k, v [T, Hkv, D]`` of the caches' dtype into slots ``[T]``, none of them -1."""
    slots = slot_mapping.long()
    k_cache.view(-1, *k_cache.shape[2:]).index_copy_(0, slots, k)
    v_cache.view(-1, *v_cache.shape[2:]).index_copy_(0, slots, v)


def rope_sets(rope: RopeSpec | None, lens: StepLens) -> tuple[int, ...]:
    """Per row, the cos/sin table set its keys take: 1 (longrope's long factors) once the row is longer than
    the switch, else 0 (the whole sequence switches at once, as in HF)."""
    if rope is None or rope.long_inv_freq is None:
        return (0,) * lens.batch_size
    return tuple(int(n > rope.original_max_position) for n in lens.kv_lens)


class WorkingKV:
    """One layer's working copy: rotated keys and values of a batch of sequences (see the module docstring).

    Attributes:
        k, v: ``[B, Hkv, capacity, D]`` in the work dtype, or None (nothing kept).
        held: per row, the tokens the copy holds; ``sets``: per row, the table set its keys were rotated with.
        stamp: the caller's stamp when the copy was last brought up to date.
    """

    def __init__(self):
        self.k: torch.Tensor | None = None
        self.v: torch.Tensor | None = None
        self.held: tuple[int, ...] = ()
        self.sets: tuple[int, ...] = ()
        self.stamp: object = None

    @property
    def nbytes(self) -> int:
        """Bytes held (K and V)."""
        return 0 if self.k is None else 2 * self.k.numel() * self.k.element_size()

    def drop(self) -> None:
        """Forget the copy (its memory goes back)."""
        self.k = self.v = None
        self.held, self.sets, self.stamp = (), (), None

    def attend(self, q: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor, k_cache: torch.Tensor,
               v_cache: torch.Tensor, block_table: torch.Tensor, rope: RopeSpec | None, lens: StepLens, *,
               sm_scale: float, stamp: object, causal: bool = True, sliding_window: int | None = None,
               out: torch.Tensor | None = None) -> torch.Tensor:
        """`cattn.ops.paged_attention`'s result for one step, through the working copy.

        Args:
            q: ``[total_q, Hq, D]`` the new tokens' queries, pre-RoPE, fp16/bf16/fp32.
            k_new, v_new: ``[total_q, Hkv, D]`` their keys (pre-RoPE) and values, already written to the pages.
            k_cache, v_cache: ``[num_pages, page_size, Hkv, D]`` the layer's pages, pre-RoPE keys.
            block_table: ``[B, max_pages]`` int32/int64 page ids of each row.
            rope: the layer's `RopeSpec`, or None.
            lens: the step's `StepLens` (``kv_lens`` count this step's tokens).
            sm_scale: the softmax scale.
            stamp: the pages' edit stamp: the copy is trusted only while it is the one it was updated under.
            causal, sliding_window: as in `cattn.ops.paged_attention`.
            out: optional ``[total_q, Hq, D]`` buffer of q's dtype.

        Returns ``[total_q, Hq, D]`` in q's dtype. Inputs are assumed valid (`cattn.ops` checks them).
        """
        work = torch.promote_types(q.dtype, torch.float32)
        sets = rope_sets(rope, lens)
        table = None if rope is None else cos_sin_table(rope, max(lens.max_kv_len, 1), torch.float32, q.device)
        q_rot, k_rot = _rotate_new(q, k_new, rope, table, sets, lens, work)
        if self.k is not None and (self.stamp, self.held, self.sets) == (stamp, lens.past, sets) \
                and self.k.dtype == work:
            self._append(k_rot, v_new, lens)
        elif lens.prefill:
            self.drop()
            keys, values = _new_only(k_rot, v_new, lens)
            return _sdpa(q_rot, keys, values, lens, sm_scale, causal, sliding_window, out, q.dtype)
        else:
            self._rebuild(k_cache, v_cache, block_table, rope, table, sets, lens, work)
        self.held, self.sets, self.stamp = lens.kv_lens, sets, stamp
        keys, values = self.k[:, :, : lens.max_kv_len], self.v[:, :, : lens.max_kv_len]
        return _sdpa(q_rot, keys, values, lens, sm_scale, causal, sliding_window, out, q.dtype)

    # ---- keeping the copy ----------------------------------------------------------------------------------
    def _allocate(self, batch: int, capacity: int, keep: int, like: torch.Tensor, dtype: torch.dtype) -> None:
        """Fresh zeroed buffers ``[batch, Hkv, capacity, D]`` (Hkv, D and the device of ``like``, a K/V tensor)
        holding the first ``keep`` tokens of the old ones. Zeros: keys past a row's length are read (masked),
        so they must be finite."""
        num_kv_heads, head_dim = like.shape[-2:]
        old_k, old_v = self.k, self.v
        self.k = torch.zeros(batch, num_kv_heads, capacity, head_dim, dtype=dtype, device=like.device)
        self.v = torch.zeros_like(self.k)
        if keep:
            self.k[:, :, :keep] = old_k[:, :, :keep]
            self.v[:, :, :keep] = old_v[:, :, :keep]

    def _append(self, k_rot: torch.Tensor, v_new: torch.Tensor, lens: StepLens) -> None:
        """Write the step's rotated keys and its values after each row's tokens (see `_rotate_new` for shapes)."""
        if lens.max_kv_len > self.k.shape[2]:
            capacity = max(lens.max_kv_len + HEADROOM, int(self.k.shape[2] * GROWTH))
            self._allocate(self.k.shape[0], capacity, max(self.held), self.v.transpose(1, 2), self.k.dtype)
        if lens.uniform:
            # every row appends the same positions: one slice per tensor, [B, T, Hkv, D] seen as [B, Hkv, T, D]
            new = slice(lens.past[0], lens.max_kv_len)
            self.k[:, :, new] = k_rot.transpose(1, 2)
            self.v[:, :, new] = v_new.view(k_rot.shape).transpose(1, 2)
        else:
            rows, _, pos = lens.tokens
            self.k[rows, :, pos] = k_rot
            self.v[rows, :, pos] = v_new.to(self.v.dtype)

    def _rebuild(self, k_cache, v_cache, block_table, rope, table, sets, lens: StepLens, work) -> None:
        """The copy from the pages: every row's first ``kv_len`` tokens gathered in one index_select per tensor
        (all rows at once), keys rotated at positions ``0..kv_len-1``."""
        batch, page_size, max_kv = lens.batch_size, k_cache.shape[1], lens.max_kv_len
        num_pages = -(-max_kv // page_size)
        # entries past a row's pages are never meaningful: clamp them into the pool, the tokens are zeroed below
        pages = block_table[:, :num_pages].long().clamp(0, max(k_cache.shape[0] - 1, 0)).flatten()
        self.drop()
        self._allocate(batch, max_kv + HEADROOM, 0, k_cache, work)
        keys = k_cache.index_select(0, pages).view(batch, num_pages * page_size, *k_cache.shape[2:])[:, :max_kv]
        values = v_cache.index_select(0, pages).view(batch, num_pages * page_size, *v_cache.shape[2:])[:, :max_kv]
        if not lens.uniform:
            # unwritten slots may hold anything, NaN included: zero every token past its row's length
            beyond = torch.arange(max_kv, device=keys.device)[None, :] >= keys.new_tensor(lens.kv_lens,
                                                                                           dtype=torch.long)[:, None]
            keys = keys.masked_fill(beyond[:, :, None, None], 0)
            values = values.masked_fill(beyond[:, :, None, None], 0)
        k_rows = self.k[:, :, :max_kv].transpose(1, 2)                     # [B, max_kv, Hkv, D] views
        if rope is None:
            k_rows.copy_(keys)
        else:
            cos_sin = table[sets[0], :max_kv] if len(set(sets)) == 1 else table[list(sets), :max_kv]
            reference.rotate(keys, cos_sin, rope, out=k_rows)
        self.v[:, :, :max_kv].transpose(1, 2).copy_(values)


def _rotate_new(q, k_new, rope, table, sets, lens: StepLens, work) -> tuple[torch.Tensor, torch.Tensor]:
    """The step's queries and new keys rotated at their positions, in the work dtype, in one rotation (Q and K
    side by side on the head axis): ``[B, T, Hq, D]`` and ``[B, T, Hkv, D]`` views for a uniform step, else
    packed ``[total_q, Hq, D]`` and ``[total_q, Hkv, D]``."""
    if lens.uniform:
        q, k_new = q.view(lens.batch_size, -1, *q.shape[1:]), k_new.view(lens.batch_size, -1, *k_new.shape[1:])
    if rope is None:
        return q.to(work), k_new.to(work)
    if lens.uniform:
        cos_sin = table[sets[0], lens.past[0]: lens.max_kv_len]
    elif len(set(sets)) == 1:
        cos_sin = table[sets[0]].index_select(0, lens.tokens[2])
    else:
        rows, _, pos = lens.tokens
        cos_sin = table[torch.tensor(sets, dtype=torch.long)[rows], pos]
    both = reference.rotate(torch.cat((q, k_new), dim=-2), cos_sin, rope)
    return both[..., : q.shape[-2], :], both[..., q.shape[-2]:, :]


def _new_only(k_rot: torch.Tensor, v_new: torch.Tensor, lens: StepLens) -> tuple[torch.Tensor, torch.Tensor]:
    """A prefill's keys and values ``[B, Hkv, max_kv, D]`` from its new tokens alone (the pages hold nothing
    else): key index = position, zeros past a row's length."""
    if lens.uniform:
        return k_rot.transpose(1, 2), v_new.view(k_rot.shape).to(k_rot.dtype).transpose(1, 2)
    keys = k_rot.new_zeros(lens.batch_size, lens.max_kv_len, *k_rot.shape[1:])
    values = torch.zeros_like(keys)
    rows, _, pos = lens.tokens
    keys[rows, pos] = k_rot
    values[rows, pos] = v_new.to(keys.dtype)
    return keys.transpose(1, 2), values.transpose(1, 2)


def _sdpa(q_rot, keys, values, lens: StepLens, sm_scale, causal, sliding_window, out, dtype):
    """Lay the rotated queries out ``[B, Hq, max_q_len, D]``, attend over ``keys``/``values``
    ``[B, Hkv, max_kv_len, D]`` (key index = position) with one SDPA call; back to ``[total_q, Hq, D]`` in
    ``dtype`` (or into ``out``)."""
    if lens.uniform:
        queries = q_rot.transpose(1, 2)
    else:
        queries = q_rot.new_zeros(lens.batch_size, lens.max_q_len, *q_rot.shape[1:])
        queries[lens.tokens[:2]] = q_rot
        queries = queries.transpose(1, 2)
    mask, is_causal = _mask(lens, causal, sliding_window, q_rot.device)
    attended = F.scaled_dot_product_attention(queries, keys, values, attn_mask=mask, is_causal=is_causal,
                                              scale=sm_scale, enable_gqa=True).transpose(1, 2)
    num_q_heads, head_dim = q_rot.shape[-2:]
    packed = attended.reshape(-1, num_q_heads, head_dim) if lens.uniform else attended[lens.tokens[:2]]
    if out is None:
        return packed.to(dtype)
    return out.copy_(packed)


def _mask(lens: StepLens, causal: bool, sliding_window: int | None, device) -> tuple[torch.Tensor | None, bool]:
    """``(attn_mask, is_causal)`` for SDPA: nothing where every key is visible (a uniform decode, or a
    non-causal uniform batch), SDPA's own band for a uniform prefill, else a boolean
    ``[B, 1, max_q_len, max_kv_len]`` mask (key index = position)."""
    if lens.uniform and sliding_window is None:
        if not causal or lens.max_q_len == 1:
            return None, False
        if lens.prefill:
            return None, True                  # top-left band = bottom-right band when q_len == kv_len
    kv = torch.tensor(lens.kv_lens, dtype=torch.long, device=device)[:, None, None]
    q_pos = kv - lens.max_q_len + torch.arange(lens.max_q_len, device=device)[None, :, None]   # [B, max_q, 1]
    k_pos = torch.arange(lens.max_kv_len, device=device)[None, None, :]                      # [1, 1, max_kv]
    visible = k_pos <= q_pos if causal else k_pos < kv
    if sliding_window is not None:
        visible = visible & (q_pos - k_pos < sliding_window)
    # padding columns (position < 0) see key 0 so that no row of the softmax is empty; their output is dropped
    visible = visible | ((q_pos < 0) & (k_pos == 0))
    return visible[:, None], False
