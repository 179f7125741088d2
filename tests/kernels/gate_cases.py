"""Configurations the machine-code gate must reject, one per rule, and the verdicts as JSON.

    python -m tests.kernels.gate_cases        (prints {case: [violations]})

Run in a child process by tests/kernels/test_compile.py: compiling needs the interpreter off.
"""
from __future__ import annotations

import json
import os

os.environ["TRITON_INTERPRET"] = "0"

import torch  # noqa: E402
import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from bench import sass  # noqa: E402
from cattn.configs import TileConfig  # noqa: E402
from cattn.launch import ShippedConfig, attention_config, dequant_configs, shipped_configs  # noqa: E402


@triton.jit
def trig_in_loop_kernel(x_ptr, out_ptr, n, BLOCK: tl.constexpr):
    """A key loop that computes cos/sin of its positions in the loop, as the kernels once did."""
    offs = tl.arange(0, BLOCK)
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for start in range(0, n, BLOCK):
        angle = (start + offs).to(tl.float32) * 0.5
        acc += tl.load(x_ptr + start + offs) * tl.cos(angle) + tl.sin(angle)
    tl.store(out_ptr + offs, acc)


def bad_cases() -> dict:
    d128 = next(c for c in shipped_configs() if c.name == "prefill_bf16_d128")
    trig = ShippedConfig("trig", trig_in_loop_kernel, {"x_ptr": "*fp32", "out_ptr": "*fp32", "n": "i32",
                                                       "BLOCK": "constexpr"}, {"BLOCK": 128}, 4, 1,
                         ("x_ptr", "out_ptr"))
    return {
        # 64 rows over 8 warps: both warpgroups compute the same QK^T
        "duplicated_qk": (attention_config("prefill", torch.bfloat16, 128, 4, TileConfig(64, 32, 8, 2),
                                            name="prefill_64x32_w8"), True),
        # without the runtime's divisibility: scalar 16-bit K/V loads, no cp.async
        "no_hints": (d128, False),
        # trigonometry in a loop: libdevice sinf/cosf with its local-memory slow path
        "trig": (trig, True),
        # the store's dequantization without the runtime's 16-byte alignment: byte-wide code loads
        "dequant_no_hints": (dequant_configs()[0], False),
        # 128 x 128 fp32 tiles: far past the register file
        "spills": (attention_config("prefill", torch.float32, 128, 4, TileConfig(128, 64, 4, 1),
                                     name="prefill_fp32_128x64"), True),
    }


def main() -> None:
    verdicts = {}
    for name, (cfg, use_hints) in bad_cases().items():
        verdicts[name] = sass.gate(cfg, sass.compile_config(cfg, use_hints=use_hints))
    print(json.dumps(verdicts))


if __name__ == "__main__":
    main()
