"""A static pipe model of one key tile on one Hopper SM: SASS counts in, clocks per pipe out.

ESTIMATES FROM STATIC CODE, NOT MEASUREMENTS. The model and its assumptions (Hopper sm_90, per SM
per clock):

- issue: 4 warp-instructions (one per scheduler); every instruction of the loop body counts once,
  whatever its predicate;
- FMA pipe: FP32 FFMA/FMUL/FADD at 128 lanes, IMAD at 64 lanes on the same pipe;
- ALU: integer, logic, compare, select, move, FMNMX, I2FP, F2FP at 64 lanes;
- XU: MUFU, I2F, F2I, F2F, FRND at 16 lanes;
- shared memory: 128 B per clock, counting LDS/STS/LDSM/STSM widths, cp.async writes, and the
  operands a wgmma reads from shared memory (B always, A when its descriptor says so);
- tensor: dense bf16/fp16 wgmma 4,096 FLOP per clock, mma.sync 2,048.

The bound is the slowest pipe, assuming perfect overlap (latency, dependency stalls, barrier waits
and the L2 are not modelled, so these figures are optimistic). Prefill reports useful work (4 x rows
x keys x head_dim FLOP per tile) at the bound as a fraction of the tensor peak, and as TFLOP/s after
the calibration the Triton tutorial's fused attention gets against the same model (0.6: the model
puts it at 100% of the tensor pipe, an H100 measures it at 500-600+ of ~989 TFLOP/s), at 132 SMs x
1.98 GHz. Decode reports the K+V bytes per second the SMs could consume at the bound; it is
memory-bound when that exceeds the measured 4.25 TB/s device copy.
"""
from __future__ import annotations

import re

SMS, CLOCK_HZ = 132, 1.98e9
TENSOR_FLOP_CLK, HMMA_FLOP_CLK = 4096, 2048
CALIBRATION = 0.6
HBM_BYTES_S = 4.25e12
FP32 = {"FFMA", "FMUL", "FADD"}
XU = {"MUFU", "I2F", "F2I", "F2F", "FRND", "POPC", "FLO", "BREV"}
SMEM = {"LDS", "STS", "LDSM", "STSM", "LDGSTS"}
UNCOUNTED = {"BAR", "BRA", "HGMMA", "HMMA", "WARPGROUP", "WARPSYNC", "DEPBAR", "LDGDEPBAR", "SYNCS", "NOP",
             "LDG", "STG", "BSSY", "BSYNC", "UTMALDG", "YIELD", "EXIT", "LDL", "STL", "ARRIVES", "CCTL"}


def _bytes_per_lane(op: str) -> int:
    for suffix, size in ((".128", 16), (".64", 8), (".U16", 2), (".S16", 2), (".U8", 1), (".S8", 1)):
        if suffix in op:
            return size
    return 4


def pipes(body: list[tuple], num_warps: int) -> dict:
    """SM clocks per pipe for one iteration of ``body`` ([(addr, pred, op, args)]) run by ``num_warps``."""
    issue = fp32 = imad = alu = xu = smem = tensor = 0.0
    for _addr, pred, op, args in body:
        base = op.split(".")[0]
        issue += 1
        if pred == "@!PT":          # ptxas padding: issued, never executed
            continue
        if base == "HGMMA":
            m, n, k = map(int, re.match(r"HGMMA\.(\d+)x(\d+)x(\d+)", op).groups())
            a_in_smem = len(args.split(",")) > 1 and args.split(",")[1].strip().startswith("gdesc")
            smem += (n * k * 2 + (m * k * 2 if a_in_smem else 0)) * num_warps / 4
            tensor += 2 * m * n * k * num_warps / 4 / TENSOR_FLOP_CLK
        elif base == "HMMA":
            flop = 2 * 16 * 8 * (16 if op.startswith("HMMA.16816") else 8)
            tensor += flop * num_warps / HMMA_FLOP_CLK
        elif base in FP32:
            fp32 += 1
        elif base == "IMAD":
            imad += 1
        elif base in XU:
            xu += 1
        elif base in SMEM:
            if base in ("LDSM", "STSM"):
                last = op.split(".")[-1]
                smem += 128 * (int(last) if last in ("1", "2", "4") else 1) * num_warps
            else:
                smem += 32 * _bytes_per_lane(op) * num_warps
        elif base not in UNCOUNTED:
            alu += 1
    return {"issue": issue * num_warps / 4, "fma": max((fp32 + imad) * num_warps / 4, imad * num_warps / 2),
            "alu": alu * num_warps / 2, "xu": xu * num_warps * 2, "smem": smem / 128, "tensor": tensor}


def estimate(body: list[tuple], num_warps: int, work: dict, head_dim: int, group: int) -> dict:
    """The pipe clocks of one key tile, the bound, and the figure of merit of the kernel kind."""
    clocks = pipes(body, num_warps)
    bound = max(clocks, key=clocks.get)
    cycles = clocks[bound]
    out = {"clocks": {k: round(v, 1) for k, v in clocks.items()}, "bound": bound, "estimate": True}
    if work["kind"] == "prefill":
        useful = 4 * work["rows"] * work["block_n"] * head_dim
        fraction = useful / (cycles * TENSOR_FLOP_CLK)
        out.update(useful_fraction_of_peak=round(fraction, 3),
                   tflops_calibrated=round(fraction * CALIBRATION * TENSOR_FLOP_CLK * SMS * CLOCK_HZ / 1e12, 1))
    else:
        kv_bytes = work["block_n"] * head_dim * 2 * work["elt"]
        rate = kv_bytes / cycles * SMS * CLOCK_HZ
        out.update(kv_bytes_per_s=round(rate / 1e12, 2) * 1e12, memory_bound=rate >= HBM_BYTES_S)
    return out


def ctas_per_sm(registers: int, num_warps: int, shared_bytes: int) -> int:
    """Resident CTAs per SM: 65,536 registers (allocated per warp in units of 8 per thread), 228 KiB of
    shared memory (1 KiB reserved per CTA), 64 warps."""
    regs = -(-registers // 8) * 8
    by_regs = 65536 // (regs * 32 * num_warps)
    by_smem = 233472 // (shared_bytes + 1024) if shared_bytes else 32
    return max(0, min(by_regs, by_smem, 64 // num_warps, 32))


def decode_shape(kv_bytes_per_s: float, ctas: int, resident: int) -> dict:
    """A decode grid of ``ctas`` programs on SMs holding ``resident`` each: waves, and whether the SMs can
    consume K/V faster than the device copy (memory-bound). Every wave is memory-bound when its CTAs
    keep enough bytes in flight, which the 2-3 cp.async stages of each CTA do at these sizes; a
    partial last wave costs its share of bytes, not a whole wave, when it is memory-bound."""
    slots = resident * SMS
    return {"ctas": ctas, "slots": slots, "waves": round(ctas / slots, 2) if slots else None,
            "sm_kv_bytes_per_s": kv_bytes_per_s, "memory_bound": kv_bytes_per_s >= HBM_BYTES_S}
