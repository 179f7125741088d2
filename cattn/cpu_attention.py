"""Paged attention on the CPU, built for speed: what `cattn.ops.paged_attention` runs with ``backend="auto"``
on a CPU tensor. The float64 oracle stays `cattn.reference`, plain (``backend="torch"``).

Per sequence, its K/V are gathered from the pages, Q and K are rotated from the cached cos/sin table
(`cattn.rope_table`: no trigonometry per call), and SDPA's fused kernel attends with GQA: no
``[q_len, kv_len]`` score matrix is ever held. The causal band is SDPA's own when the whole sequence is
the query (a prefill); an extend or a sliding window passes a boolean mask (``q_len x kv_len`` bytes).

Numerics: the rotation and the attention run in q's dtype promoted to at least fp32, as the reference
does, with the same fp32 cos/sin, so the two differ only by SDPA's summation order. Logit softcapping
has no SDPA form: a layer with one runs the reference, as does float64 (the oracle's dtype).

Memory per call: one sequence's gathered K and V and its rotated K, in the work dtype (``O(kv_len)``);
nothing outlives the call.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from cattn import reference
from cattn.rope import RopeSpec
from cattn.rope_table import cos_sin_table


def paged_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_table: torch.Tensor,
                    kv_lens: torch.Tensor, cu_seqlens_q: torch.Tensor, rope: RopeSpec | None, *,
                    sm_scale: float | None = None, causal: bool = True, sliding_window: int | None = None,
                    logit_softcap: float | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
    """`cattn.reference.paged_attention`'s contract (shapes as in `cattn.ops.paged_attention`), computed with
    SDPA. Inputs are assumed valid (`cattn.ops` checks them)."""
    if logit_softcap is not None or q.dtype == torch.float64:
        return reference.paged_attention(q, k_cache, v_cache, block_table, kv_lens, cu_seqlens_q, rope,
                                         sm_scale=sm_scale, causal=causal, sliding_window=sliding_window,
                                         logit_softcap=logit_softcap, out=out)
    scale = sm_scale if sm_scale is not None else q.shape[2] ** -0.5
    work = torch.promote_types(q.dtype, torch.float32)
    out = torch.empty_like(q) if out is None else out
    kv_lens_list, cu = kv_lens.tolist(), cu_seqlens_q.tolist()
    table = None
    if rope is not None and kv_lens_list:
        table = cos_sin_table(rope, max(kv_lens_list), torch.float32, q.device)
    for b, kv_len in enumerate(kv_lens_list):
        q_start, q_end = cu[b], cu[b + 1]
        q_len = q_end - q_start
        if q_len == 0:
            continue
        k = reference.gather_kv(k_cache, block_table[b], kv_len).to(work)
        v = reference.gather_kv(v_cache, block_table[b], kv_len).to(work)
        qb = q[q_start:q_end].to(work)
        if table is not None:
            # longrope: the whole sequence takes the long factors once it is longer than the switch
            long = rope.long_inv_freq is not None and kv_len > rope.original_max_position
            cos_sin = table[int(long), :kv_len].to(work)
            qb, k = reference.rotate(qb, cos_sin[kv_len - q_len:], rope), reference.rotate(k, cos_sin, rope)
        mask, is_causal = None, False
        if sliding_window is not None or (causal and q_len != kv_len):
            q_pos = torch.arange(kv_len - q_len, kv_len, device=q.device)[:, None]
            k_pos = torch.arange(kv_len, device=q.device)[None, :]
            visible = q_pos - k_pos < (sliding_window if sliding_window is not None else kv_len + 1)
            mask = visible & (k_pos <= q_pos) if causal else visible
        elif causal and q_len > 1:
            is_causal = True                     # a prefill: SDPA's own (top-left = bottom-right) band
        ob = F.scaled_dot_product_attention(qb.transpose(0, 1)[None], k.transpose(0, 1)[None],
                                            v.transpose(0, 1)[None], attn_mask=mask, is_causal=is_causal,
                                            scale=scale, enable_gqa=True)
        out[q_start:q_end] = ob[0].transpose(0, 1).to(out.dtype)
    return out
