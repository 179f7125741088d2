"""Triton launchers: tile configuration, grids and workspaces. Arguments are already checked by `cattn.ops`.

Configurations are chosen by rule, not autotuned, so that every configuration a
launcher can pick is listed by `shipped_configs` and compiled for sm_90 in CI. The
rule is what fits Hopper's 255 registers per thread without spills (checked with
ptxas for every entry of `shipped_configs`): K is rotated in registers, so a K tile
costs its cos/sin and fp32 halves on top of the usual Q, accumulator and pointers.

- prefill/extend, 16-bit: rows (query tokens x GQA group) ``BLOCK_R`` = 128 for head_dim
  <= 64, else 64; keys per tile ``BLOCK_N`` = 32 (16 past 128); 8 warps. fp32 (IEEE dots,
  no tensor cores): 32 x 16 tiles, 16 x 16 past 128, 4 warps.
- decode: rows = the GQA group padded to 16 (``tl.dot``'s minimum); ``BLOCK_N`` = 32 for
  16-bit heads up to 128, else 16; fp32 takes 16 keys, with 8 warps up to 128-wide heads.
  The number of KV splits fills about two waves of the GPU, and no split is shorter than
  ``MIN_SPLIT_TOKENS`` tokens.
- ``BLOCK_R`` never goes below the GQA group (padded to a power of two).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import triton

from cattn.kernels.decode import merge_splits_kernel, paged_decode_kernel
from cattn.kernels.prefill import paged_prefill_kernel
from cattn.kernels.write_kv import write_kv_kernel
from cattn.rope import RopeSpec

LOG2E = 1.4426950408889634
MIN_SPLIT_TOKENS = 512
NEVER = 2**31 - 1
TRITON_TYPES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}


@dataclass(frozen=True)
class TileConfig:
    block_rows: int
    block_n: int
    num_warps: int
    num_stages: int


def _pow2(n: int, least: int = 16) -> int:
    return max(least, triton.next_power_of_2(n))


def prefill_config(head_dim: int, group: int, dtype: torch.dtype) -> TileConfig:
    d_pad = _pow2(head_dim)
    if dtype == torch.float32:
        rows, block_n, warps, stages = (32 if d_pad <= 128 else 16), 16, 4, 1
    elif d_pad <= 64:
        rows, block_n, warps, stages = 128, 32, 8, 2
    elif d_pad <= 128:
        rows, block_n, warps, stages = 64, 32, 8, 2
    else:
        rows, block_n, warps, stages = 64, 16, 8, 2
    return TileConfig(max(rows, _pow2(group)), block_n, warps, stages)


def decode_config(head_dim: int, group: int, dtype: torch.dtype) -> TileConfig:
    if dtype == torch.float32:
        return TileConfig(_pow2(group), 16, 8 if _pow2(head_dim) <= 128 else 4, 1)
    return TileConfig(_pow2(group), 32 if _pow2(head_dim) <= 128 else 16, 4, 2)


def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4  # the interpreter: a few splits, so tests exercise the merge


def _num_splits(batch: int, num_kv_heads: int, max_kv_len: int, device: torch.device) -> int:
    want = triton.cdiv(2 * _num_sms(device), max(1, batch * num_kv_heads))
    return max(1, min(want, triton.cdiv(max_kv_len, MIN_SPLIT_TOKENS)))


def _rope_args(rope: RopeSpec | None, head_dim: int, device):
    """Kernel arguments of a rope: (inv_freq table [2, rotary_dim/2] fp32 whose row 1 serves sequences
    longer than ``long_after`` tokens (longrope's long factors), attention scaling, long_after,
    rotary_dim, half_pad, pass_pad, gptj)."""
    if rope is None:
        return torch.zeros(2, 1, dtype=torch.float32, device=device), 1.0, NEVER, 0, 16, _pow2(head_dim), False
    long_after = NEVER if rope.original_max_position is None else rope.original_max_position
    rot = rope.rotary_dim
    table = rope.freq_table.to(device)  # no copy when the caller moved the spec (RopeSpec.to) already
    return (table, float(rope.attention_scaling), long_after, rot, _pow2(rot // 2), _pow2(head_dim - rot),
            rope.style == "gptj")


def launch_write_kv(k, v, k_cache, v_cache, slot_mapping) -> None:
    num_tokens, num_kv_heads, head_dim = k.shape
    if num_tokens == 0:
        return
    write_kv_kernel[(num_tokens,)](
        k, v, k_cache, v_cache, slot_mapping, k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), v_cache.stride(0), v_cache.stride(1),
        v_cache.stride(2), NUM_KV_HEADS=num_kv_heads, HEAD_DIM=head_dim, HEADS_PAD=triton.next_power_of_2(num_kv_heads),
        D_PAD=triton.next_power_of_2(head_dim), PAGE_SIZE=k_cache.shape[1], num_warps=4)


def launch_paged_attention(q, k_cache, v_cache, block_table, kv_lens, cu_seqlens_q, rope, *, sm_scale: float,
                           causal: bool, out, max_q_len: int) -> torch.Tensor:
    total_q, num_q_heads, head_dim = q.shape
    page_size, num_kv_heads = k_cache.shape[1], k_cache.shape[2]
    group, batch = num_q_heads // num_kv_heads, block_table.shape[0]
    out = torch.empty_like(q) if out is None else out
    if total_q == 0:
        return out
    max_kv_len = block_table.shape[1] * page_size   # an upper bound known without reading kv_lens
    inv_freq, rope_scaling, long_after, rot, half_pad, pass_pad, gptj = _rope_args(rope, head_dim, q.device)
    shared = dict(GROUP=group, PAGE_SIZE=page_size, HEAD_DIM=head_dim, D_PAD=_pow2(head_dim), ROT=rot,
                  HALF_PAD=half_pad, PASS_PAD=pass_pad, GPTJ=gptj,
                  DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32")
    qk_scale_log2 = sm_scale * LOG2E
    kc, vc = k_cache.stride(), v_cache.stride()
    if max_q_len == 1:
        cfg = decode_config(head_dim, group, q.dtype)
        splits = _num_splits(batch, num_kv_heads, max_kv_len, q.device)
        d_pad = _pow2(head_dim)
        partial_out = torch.empty(total_q, num_q_heads, splits, d_pad, dtype=torch.float32, device=q.device)
        partial_lse = torch.empty(total_q, num_q_heads, splits, dtype=torch.float32, device=q.device)
        paged_decode_kernel[(batch, num_kv_heads, splits)](
            q, k_cache, v_cache, partial_out, partial_lse, block_table, kv_lens, cu_seqlens_q, inv_freq,
            rope_scaling, long_after, qk_scale_log2, splits, q.stride(0), q.stride(1), kc[0], kc[1], kc[2], vc[0], vc[1], vc[2],
            block_table.stride(0), BLOCK_H=cfg.block_rows, BLOCK_N=cfg.block_n, num_warps=cfg.num_warps,
            num_stages=cfg.num_stages, **shared)
        merge_splits_kernel[(total_q, num_q_heads)](
            partial_out, partial_lse, out, splits, out.stride(0), out.stride(1), NUM_HEADS=num_q_heads,
            HEAD_DIM=head_dim, D_PAD=d_pad, SPLITS_PAD=triton.next_power_of_2(splits), num_warps=4)
        return out
    cfg = prefill_config(head_dim, group, q.dtype)
    tokens_per_block = cfg.block_rows // group
    grid = (triton.cdiv(max_q_len, tokens_per_block), num_kv_heads, batch)
    paged_prefill_kernel[grid](
        q, k_cache, v_cache, out, block_table, kv_lens, cu_seqlens_q, inv_freq, rope_scaling, long_after,
        qk_scale_log2, q.stride(0), q.stride(1), out.stride(0), out.stride(1), kc[0], kc[1], kc[2], vc[0], vc[1], vc[2],
        block_table.stride(0), CAUSAL=causal, BLOCK_R=cfg.block_rows, BLOCK_N=cfg.block_n,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages, **shared)
    return out


@dataclass(frozen=True)
class ShippedConfig:
    """One kernel configuration the launchers can pick, in the form `triton.compile` takes."""

    name: str
    kernel: object
    signature: dict
    constexprs: dict
    num_warps: int
    num_stages: int


def _signature(kernel, pointers: dict, scalars: dict, constexprs: dict) -> dict:
    """Triton type strings for every argument: ``*dtype`` for pointers, i32/fp32 for scalars."""
    sig = {}
    for name in kernel.arg_names:
        if name in constexprs:
            sig[name] = "constexpr"
        elif name in pointers:
            sig[name] = "*" + pointers[name]
        else:
            sig[name] = scalars.get(name, "i32")
    return sig


def shipped_configs() -> list[ShippedConfig]:
    """Every (kernel, tile configuration) the launchers pick for head_dim 64, 80, 128 and 256 with GQA
    group 4, in bf16 and fp32 (fp32 takes the IEEE dot path), page size 16, neox RoPE over the whole head."""
    configs = []
    for dtype in (torch.bfloat16, torch.float32):
        t = TRITON_TYPES[dtype]
        for head_dim in (64, 80, 128, 256):
            group, rot = 4, head_dim
            shared = dict(GROUP=group, PAGE_SIZE=16, HEAD_DIM=head_dim, D_PAD=_pow2(head_dim), ROT=rot,
                          HALF_PAD=_pow2(rot // 2), PASS_PAD=16, GPTJ=False,
                          DOT_PRECISION="ieee" if dtype == torch.float32 else "tf32")
            index = dict(block_table="i32", kv_lens="i32", cu_seqlens_q="i32", inv_freq_ptr="fp32")
            scalars = dict(rope_scaling="fp32", qk_scale_log2="fp32")
            cfg = prefill_config(head_dim, group, dtype)
            ce = dict(shared, CAUSAL=True, BLOCK_R=cfg.block_rows, BLOCK_N=cfg.block_n)
            ptrs = dict(index, q_ptr=t, k_cache=t, v_cache=t, out_ptr=t)
            configs.append(ShippedConfig(f"prefill_{t}_d{head_dim}", paged_prefill_kernel,
                                         _signature(paged_prefill_kernel, ptrs, scalars, ce), ce,
                                         cfg.num_warps, cfg.num_stages))
            cfg = decode_config(head_dim, group, dtype)
            ce = dict(shared, BLOCK_H=cfg.block_rows, BLOCK_N=cfg.block_n)
            ptrs = dict(index, q_ptr=t, k_cache=t, v_cache=t, partial_out="fp32", partial_lse="fp32")
            configs.append(ShippedConfig(f"decode_{t}_d{head_dim}", paged_decode_kernel,
                                         _signature(paged_decode_kernel, ptrs, scalars, ce), ce,
                                         cfg.num_warps, cfg.num_stages))
            ce = dict(NUM_HEADS=32, HEAD_DIM=head_dim, D_PAD=_pow2(head_dim), SPLITS_PAD=64)
            ptrs = dict(partial_out="fp32", partial_lse="fp32", out_ptr=t)
            configs.append(ShippedConfig(f"merge_{t}_d{head_dim}", merge_splits_kernel,
                                         _signature(merge_splits_kernel, ptrs, {}, ce), ce, 4, 1))
            ce = dict(NUM_KV_HEADS=8, HEAD_DIM=head_dim, HEADS_PAD=8, D_PAD=_pow2(head_dim, 1), PAGE_SIZE=16)
            ptrs = dict(k_ptr=t, v_ptr=t, k_cache=t, v_cache=t, slot_mapping="i32")
            configs.append(ShippedConfig(f"write_kv_{t}_d{head_dim}", write_kv_kernel,
                                         _signature(write_kv_kernel, ptrs, {}, ce), ce, 4, 1))
    return configs
