"""Triton launchers: tile configuration, grids and workspaces. Arguments are already checked by `cattn.ops`.

Configurations come from the device's tuned file (`cattn.configs`, written by
``bench/tune.py``) when it has the problem, else from the rule below, never from an
autotuner at run time: every configuration a launcher can pick is listed by
`shipped_configs` and passes the machine-code gate in CI (``bench/sass.py``: compiled for
sm_90 as a real launch specialises it, no spills, no duplicated tensor-core work, no
trigonometry, 16-byte cp.async K/V loads). The rule, 16-bit:

- prefill/extend: 128 rows (query tokens x the GQA group) per program over 8 warps, so
  each of the two warpgroups owns 64 distinct rows (with 64 rows, 8 warps would compute
  the same QK^T twice); 64 keys per tile over 3 stages for heads up to 128 wide. A
  256-wide head takes 64 rows on one warpgroup (4 warps) and 16 keys over 3 stages.
  Rows never go below the GQA group (padded to a power of two).
- decode: rows = the GQA group padded to 16 (``tl.dot``'s minimum); 64 keys per tile over
  3 stages up to 128-wide heads, else 32 over 2. The number of KV splits fills about two
  waves of the GPU, and no split is shorter than ``MIN_SPLIT_TOKENS`` tokens.
- fp32 (IEEE dots, no tensor cores), one stage: prefill 32 x 16 tiles (16 x 16 past 128-wide
  heads), decode 16 keys; 8 warps for 128-wide (padded) heads, else 4 (8 warps over a 64-wide
  fp32 tile split its rows into 8-byte loads; 4 warps over 128-wide prefill spill under
  Triton 3.6).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import triton

from cattn import configs
from cattn.configs import TileConfig
from cattn.kernels.decode import merge_splits_kernel, paged_decode_kernel
from cattn.kernels.dequant_kv import dequant_kv_kernel
from cattn.kernels.prefill import paged_prefill_kernel, rotate_q_kernel
from cattn.kernels.write_kv import write_kv_kernel
from cattn.rope import RopeSpec
from cattn.rope_table import cos_sin_table

LOG2E = 1.4426950408889634
MIN_SPLIT_TOKENS = 512
NEVER = 2**31 - 1
TRITON_TYPES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}


def _pow2(n: int, least: int = 16) -> int:
    return max(least, triton.next_power_of_2(n))


def rule_prefill_config(head_dim: int, group: int, dtype: torch.dtype) -> TileConfig:
    d_pad = _pow2(head_dim)
    if dtype == torch.float32:
        rows, block_n, warps, stages = 32 if d_pad <= 128 else 16, 16, 8 if d_pad == 128 else 4, 1
    elif d_pad <= 128:
        rows, block_n, warps, stages = 128, 64, 8, 3
    else:
        rows, block_n, warps, stages = 64, 16, 4, 3
    return TileConfig(max(rows, _pow2(group)), block_n, warps, stages)


def rule_decode_config(head_dim: int, group: int, dtype: torch.dtype) -> TileConfig:
    if dtype == torch.float32:
        return TileConfig(_pow2(group), 16, 8 if _pow2(head_dim) == 128 else 4, 1)
    if _pow2(head_dim) <= 128:
        return TileConfig(_pow2(group), 64, 4, 3)
    return TileConfig(_pow2(group), 32, 4, 2)


def pre_rotates_q(head_dim: int, dtype: torch.dtype) -> bool:
    """256-wide 16-bit heads rotate Q in a pass of their own (`rotate_q_kernel`): Q read from memory feeds
    the tensor cores from shared memory, which frees the registers the tile needs."""
    return dtype != torch.float32 and _pow2(head_dim) > 128


def prefill_config(head_dim: int, group: int, dtype: torch.dtype, device=None) -> TileConfig:
    """The device's tuned configuration for this problem, else the rule's."""
    tuned = configs.tuned("prefill", device, dtype, head_dim, group) if device is not None else None
    return tuned or rule_prefill_config(head_dim, group, dtype)


def decode_config(head_dim: int, group: int, dtype: torch.dtype, device=None) -> TileConfig:
    tuned = configs.tuned("decode", device, dtype, head_dim, group) if device is not None else None
    return tuned or rule_decode_config(head_dim, group, dtype)


def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4  # the interpreter: a few splits, so tests exercise the merge


def num_splits(batch: int, num_kv_heads: int, max_kv_len: int, device: torch.device) -> int:
    """How many KV splits a decode launch uses: about two waves of the device, at least 512 keys each."""
    want = triton.cdiv(2 * _num_sms(device), max(1, batch * num_kv_heads))
    return max(1, min(want, triton.cdiv(max_kv_len, MIN_SPLIT_TOKENS)))


def _rope_args(rope: RopeSpec | None, head_dim: int, dtype: torch.dtype, num_positions: int, device) -> dict:
    """Kernel arguments of a rope: its cos/sin table (`cattn.rope_table`) covering ``num_positions``,
    the length past which a sequence reads the table's second set (longrope's long factors) and
    that set's offset, and the constexprs of its shape."""
    if rope is None:
        table, long_after, rot = torch.zeros(1, dtype=dtype, device=device), NEVER, 0
    else:
        table = cos_sin_table(rope, num_positions, dtype, device)
        long_after = NEVER if rope.original_max_position is None else rope.original_max_position
        rot = rope.rotary_dim
    return dict(args=(table, long_after, table[0].numel() if rope is not None else 0),
                constexprs=dict(ROT=rot, HALF_PAD=_pow2(rot // 2), PASS_PAD=_pow2(head_dim - rot),
                                GPTJ=rope is not None and rope.style == "gptj"))


def _score_args(sm_scale: float, logit_softcap: float | None) -> tuple[float, float]:
    """(score_scale, cap_log2) of `attend_kv_range`: scores enter the softmax in base 2."""
    if logit_softcap is None:
        return sm_scale * LOG2E, 0.0
    return sm_scale / logit_softcap, logit_softcap * LOG2E


def launch_write_kv(k, v, k_cache, v_cache, slot_mapping) -> None:
    num_tokens, num_kv_heads, head_dim = k.shape
    if num_tokens == 0:
        return
    write_kv_kernel[(num_tokens,)](
        k, v, k_cache, v_cache, slot_mapping, k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), v_cache.stride(0), v_cache.stride(1),
        v_cache.stride(2), NUM_KV_HEADS=num_kv_heads, HEAD_DIM=head_dim, HEADS_PAD=triton.next_power_of_2(num_kv_heads),
        D_PAD=triton.next_power_of_2(head_dim), PAGE_SIZE=k_cache.shape[1], num_warps=4)


DEQUANT_ELEMENTS = 4096   # codes per program of dequant_kv_kernel: 32 a thread over 4 warps (two 16-byte loads)


def dequant_block_tokens(num_kv_heads: int, head_dim: int) -> int:
    return max(1, DEQUANT_ELEMENTS // triton.next_power_of_2(num_kv_heads * head_dim))


def launch_dequant_kv(k_codes, k_scales, v_codes, v_scales, k_cache, v_cache, slot_mapping, *, phase: int,
                      group: int) -> None:
    num_tokens, num_kv_heads, head_dim = k_codes.shape
    if num_tokens == 0:
        return
    block_t = dequant_block_tokens(num_kv_heads, head_dim)
    dequant_kv_kernel[(triton.cdiv(num_tokens, block_t),)](
        k_codes, k_scales, v_codes, v_scales, k_cache, v_cache, slot_mapping, num_tokens, phase, GROUP=group,
        NUM_KV_HEADS=num_kv_heads, HEAD_DIM=head_dim, ROW_PAD=triton.next_power_of_2(num_kv_heads * head_dim),
        BLOCK_T=block_t, num_warps=4)


def launch_paged_attention(q, k_cache, v_cache, block_table, kv_lens, cu_seqlens_q, rope, *, sm_scale: float,
                           causal: bool, out, max_q_len: int, sliding_window: int | None = None,
                           logit_softcap: float | None = None, config: TileConfig | None = None) -> torch.Tensor:
    """``config`` forces a tile configuration (``bench/tune.py`` times candidates this way)."""
    total_q, num_q_heads, head_dim = q.shape
    page_size, num_kv_heads = k_cache.shape[1], k_cache.shape[2]
    group, batch = num_q_heads // num_kv_heads, block_table.shape[0]
    out = torch.empty_like(q) if out is None else out
    if total_q == 0:
        return out
    max_kv_len = block_table.shape[1] * page_size   # an upper bound known without reading kv_lens
    rope_args = _rope_args(rope, head_dim, q.dtype, max_kv_len, q.device)
    score_scale, cap_log2 = _score_args(sm_scale, logit_softcap)
    window = sliding_window or 0
    shared = dict(GROUP=group, PAGE_SIZE=page_size, HEAD_DIM=head_dim, D_PAD=_pow2(head_dim),
                  WINDOWED=sliding_window is not None, SOFTCAP=logit_softcap is not None,
                  DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32", **rope_args["constexprs"])
    kc, vc = k_cache.stride(), v_cache.stride()
    if max_q_len == 1:
        cfg = config or decode_config(head_dim, group, q.dtype, q.device)
        window_len = max_kv_len if sliding_window is None else min(max_kv_len, sliding_window)
        splits = num_splits(batch, num_kv_heads, window_len, q.device)
        d_pad = _pow2(head_dim)
        partial_out = torch.empty(total_q, num_q_heads, splits, d_pad, dtype=torch.float32, device=q.device)
        partial_lse = torch.empty(total_q, num_q_heads, splits, dtype=torch.float32, device=q.device)
        paged_decode_kernel[(batch, num_kv_heads, splits)](
            q, k_cache, v_cache, partial_out, partial_lse, block_table, kv_lens, cu_seqlens_q, *rope_args["args"],
            score_scale, cap_log2, window, splits, q.stride(0), q.stride(1), kc[0], kc[1], kc[2], vc[0], vc[1],
            vc[2], block_table.stride(0), BLOCK_H=cfg.block_rows, BLOCK_N=cfg.block_n, num_warps=cfg.num_warps,
            num_stages=cfg.num_stages, **shared)
        merge_splits_kernel[(total_q, num_q_heads)](
            partial_out, partial_lse, out, splits, out.stride(0), out.stride(1), NUM_HEADS=num_q_heads,
            HEAD_DIM=head_dim, D_PAD=d_pad, SPLITS_PAD=triton.next_power_of_2(splits), num_warps=4)
        return out
    cfg = config or prefill_config(head_dim, group, q.dtype, q.device)
    tokens_per_block = cfg.block_rows // group
    grid = (triton.cdiv(max_q_len, tokens_per_block), num_kv_heads, batch)
    q_in, pre_rotated = q, pre_rotates_q(head_dim, q.dtype)
    if pre_rotated:
        c = shared
        q_in = torch.empty(total_q, num_q_heads, 2 * c["HALF_PAD"] + c["PASS_PAD"], dtype=q.dtype, device=q.device)
        heads_pad = triton.next_power_of_2(num_q_heads)
        block_t = max(1, 64 // heads_pad)
        rotate_q_kernel[(triton.cdiv(max_q_len, block_t), batch)](
            q, q_in, kv_lens, cu_seqlens_q, *rope_args["args"], q.stride(0), q.stride(1), NUM_HEADS=num_q_heads,
            HEADS_PAD=heads_pad, HEAD_DIM=head_dim, ROT=c["ROT"], HALF_PAD=c["HALF_PAD"], PASS_PAD=c["PASS_PAD"],
            GPTJ=c["GPTJ"], BLOCK_T=block_t, num_warps=4)
    paged_prefill_kernel[grid](
        q_in, k_cache, v_cache, out, block_table, kv_lens, cu_seqlens_q, *rope_args["args"], score_scale, cap_log2,
        window, q_in.stride(0), q_in.stride(1), out.stride(0), out.stride(1), kc[0], kc[1], kc[2], vc[0], vc[1],
        vc[2], block_table.stride(0), CAUSAL=causal, PRE_ROTATED=pre_rotated, BLOCK_R=cfg.block_rows, BLOCK_N=cfg.block_n,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages, **shared)
    return out


@dataclass(frozen=True)
class ShippedConfig:
    """One kernel configuration the launchers can pick, in the form `triton.compile` takes.

    ``divisible`` names the arguments a real launch on the shapes of ``name`` sees as multiples
    of 16 (16-byte aligned pointers, strides of 16-multiple heads), which Triton's JIT
    specialises on: the machine-code gate compiles with the same specialisation.
    """

    name: str
    kernel: object
    signature: dict
    constexprs: dict
    num_warps: int
    num_stages: int
    divisible: tuple = ()


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


def attention_config(kind: str, dtype: torch.dtype, head_dim: int, group: int, cfg: TileConfig, *, name: str,
                     rot: int | None = None, gptj: bool = False, causal: bool = True, window: bool = False,
                     softcap: bool = False) -> ShippedConfig:
    """One attention kernel configuration as the machine-code gate compiles it: the constexprs and
    signature a launch with these options would get (``kind`` "prefill" or "decode")."""
    t = TRITON_TYPES[dtype]
    rot = head_dim if rot is None else rot
    ce = dict(GROUP=group, PAGE_SIZE=16, HEAD_DIM=head_dim, D_PAD=_pow2(head_dim), ROT=rot, HALF_PAD=_pow2(rot // 2),
              PASS_PAD=_pow2(head_dim - rot), GPTJ=gptj, WINDOWED=window, SOFTCAP=softcap,
              DOT_PRECISION="ieee" if dtype == torch.float32 else "tf32", BLOCK_N=cfg.block_n)
    ptrs = dict(q_ptr=t, k_cache=t, v_cache=t, block_table="i32", kv_lens="i32", cu_seqlens_q="i32", cos_sin_ptr=t)
    if kind == "prefill":
        kernel, ptrs = paged_prefill_kernel, dict(ptrs, out_ptr=t)
        ce.update(CAUSAL=causal, BLOCK_R=cfg.block_rows, PRE_ROTATED=pre_rotates_q(head_dim, dtype))
    else:
        kernel, ptrs = paged_decode_kernel, dict(ptrs, partial_out="fp32", partial_lse="fp32")
        ce.update(BLOCK_H=cfg.block_rows)
    scalars = dict(score_scale="fp32", cap_log2="fp32")
    divisible = tuple(n for n in kernel.arg_names if n in ptrs or n == "table_set_stride"
                      or (n.startswith("stride") and n != "stride_bt"))
    return ShippedConfig(name, kernel, _signature(kernel, ptrs, scalars, ce), ce, cfg.num_warps, cfg.num_stages,
                         divisible)


def _tuned_configs() -> list[ShippedConfig]:
    """Every entry of every shipped tuned file (`cattn.configs`)."""
    by_name = {v: k for k, v in TRITON_TYPES.items()}
    out = []
    for path in configs.shipped_files():
        for kind, entries in configs.load(path.name).items():
            for key, cfg in entries.items():
                t, d, g = key.split("_")
                out.append(attention_config(kind, by_name[t], int(d[1:]), int(g[1:]), cfg,
                                             name=f"tuned[{path.stem}]_{kind}_{key}"))
    return out


def dequant_configs() -> list[ShippedConfig]:
    """`dequant_kv_kernel` as the store's loads launch it: int8 into bf16, fp16 and fp32 pages of Llama-3's
    8 KV heads of 128, SmolLM2's 3 of 64 (a row that is not a power of two), and fp8 codes once."""
    out = []
    for codes, dtype, heads, head_dim in (("i8", torch.bfloat16, 8, 128), ("i8", torch.float16, 8, 128),
                                          ("i8", torch.float32, 8, 128), ("i8", torch.bfloat16, 3, 64),
                                          ("fp8e4nv", torch.bfloat16, 8, 128)):
        t = TRITON_TYPES[dtype]
        ce = dict(GROUP=128, NUM_KV_HEADS=heads, HEAD_DIM=head_dim, ROW_PAD=_pow2(heads * head_dim),
                  BLOCK_T=dequant_block_tokens(heads, head_dim))
        ptrs = dict(k_codes=codes, v_codes=codes, k_scales=t, v_scales=t, k_cache=t, v_cache=t, slot_mapping="i64")
        out.append(ShippedConfig(f"dequant_kv_{codes}_{t}_h{heads}_d{head_dim}", dequant_kv_kernel,
                                 _signature(dequant_kv_kernel, ptrs, {}, ce), ce, 4, 1, tuple(ptrs)))
    return out


def shipped_configs() -> list[ShippedConfig]:
    """Every (kernel, tile configuration) the launchers pick: by rule for head_dim 64, 80, 128 and 256
    with GQA group 4, in bf16 and fp32, page size 16, neox RoPE over the whole head, causal; the
    other code paths once each (non-causal, partial gptj rotary, no rope, sliding window with
    softcapping, fp16); and every entry of the tuned files."""
    out = []
    for dtype in (torch.bfloat16, torch.float32):
        t = TRITON_TYPES[dtype]
        for head_dim in (64, 80, 128, 256):
            pf, dc = rule_prefill_config(head_dim, 4, dtype), rule_decode_config(head_dim, 4, dtype)
            out.append(attention_config("prefill", dtype, head_dim, 4, pf, name=f"prefill_{t}_d{head_dim}"))
            out.append(attention_config("decode", dtype, head_dim, 4, dc, name=f"decode_{t}_d{head_dim}"))
            ce = dict(NUM_HEADS=32, HEAD_DIM=head_dim, D_PAD=_pow2(head_dim), SPLITS_PAD=64)
            ptrs = dict(partial_out="fp32", partial_lse="fp32", out_ptr=t)
            out.append(ShippedConfig(f"merge_{t}_d{head_dim}", merge_splits_kernel,
                                     _signature(merge_splits_kernel, ptrs, {}, ce), ce, 4, 1,
                                     ("partial_out", "partial_lse", "out_ptr", "stride_ot", "stride_oh")))
            ce = dict(NUM_KV_HEADS=8, HEAD_DIM=head_dim, HEADS_PAD=8, D_PAD=_pow2(head_dim, 1), PAGE_SIZE=16)
            ptrs = dict(k_ptr=t, v_ptr=t, k_cache=t, v_cache=t, slot_mapping="i32")
            out.append(ShippedConfig(f"write_kv_{t}_d{head_dim}", write_kv_kernel,
                                     _signature(write_kv_kernel, ptrs, {}, ce), ce, 4, 1,
                                     tuple(n for n in write_kv_kernel.arg_names if n in ptrs or n.startswith("stride"))))
    out += dequant_configs()
    bf16 = torch.bfloat16
    ce = dict(NUM_HEADS=32, HEADS_PAD=32, HEAD_DIM=256, ROT=256, HALF_PAD=128, PASS_PAD=16, GPTJ=False, BLOCK_T=2)
    ptrs = dict(q_ptr="bf16", q_rot_ptr="bf16", kv_lens="i32", cu_seqlens_q="i32", cos_sin_ptr="bf16")
    out.append(ShippedConfig("rotate_q_bf16_d256", rotate_q_kernel, _signature(rotate_q_kernel, ptrs, {}, ce), ce, 4, 1,
                             ("q_ptr", "q_rot_ptr", "cos_sin_ptr", "table_set_stride", "stride_qt", "stride_qh")))
    d128 = rule_prefill_config(128, 4, bf16)
    out += [
        attention_config("prefill", bf16, 128, 4, d128, name="prefill_bf16_d128_noncausal", causal=False),
        attention_config("prefill", bf16, 128, 4, d128, name="prefill_bf16_d128_gptj_half", rot=64, gptj=True),
        attention_config("prefill", bf16, 128, 4, d128, name="prefill_bf16_d128_norope", rot=0),
        attention_config("prefill", torch.float16, 128, 4, rule_prefill_config(128, 4, torch.float16),
                          name="prefill_fp16_d128"),
        attention_config("prefill", bf16, 256, 2, rule_prefill_config(256, 2, bf16),
                          name="prefill_bf16_d256_window_softcap", window=True, softcap=True),
        attention_config("decode", bf16, 256, 2, rule_decode_config(256, 2, bf16),
                          name="decode_bf16_d256_window_softcap", window=True, softcap=True),
    ]
    return out + _tuned_configs()
