"""Compile every shipped kernel configuration for Hopper (sm_90) on any machine, GPU or not, as a real
launch specialises it, run the machine-code gate on it, and estimate its key loop with the static pipe
model. ESTIMATES FROM STATIC CODE, NOT MEASUREMENTS (the model: `bench.pipe_model`).

    python -m bench.compile_report [--out PATH] [--jobs N] [--only SUBSTR] [--no-hints]

Per configuration: registers, shared memory, spills (Triton's own ptxas log), the static counts of
each key loop per warp (instructions, tensor-core instructions, cp.async loads, exp2), the gate's
verdict (`bench.sass`), and for the cheapest key loop (the unmasked one) the pipe clocks, the bound
and the figure of merit: prefill TFLOP/s-equivalent after the tutorial's calibration, decode K+V
TB/s the SMs could consume. ``--no-hints`` compiles without the runtime's specialisation, to show
what the gate would reject.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

if __package__ in (None, ""):   # run as a file path: make `bench` importable
    # the checkout's root, and not bench/ itself: bench/kernels.py would shadow the `kernels` package
    here = Path(__file__).resolve().parent
    sys.path[:] = [str(here.parent)] + [p for p in sys.path if Path(p or ".").resolve() != here]

from bench import sass  # noqa: E402  (sets TRITON_INTERPRET=0 before triton is imported)

import argparse  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from concurrent.futures import ProcessPoolExecutor  # noqa: E402
from functools import lru_cache  # noqa: E402
from multiprocessing import get_context  # noqa: E402

import triton  # noqa: E402

from bench.common import format_table, results_dir, write_json  # noqa: E402
from bench.pipe_model import SMS, ctas_per_sm, decode_shape, estimate  # noqa: E402

USE_HINTS = True
# the decode shapes of the benchmarks (GQA 32/8, head_dim 128): (name, batch, kv_len)
DECODE_SHAPES = [("decode B32 kv16K", 32, 16384), ("decode B8 kv64K", 8, 65536)]


@lru_cache(maxsize=None)
def shipped_configs() -> list:
    from cattn.launch import shipped_configs as configs
    return configs()


def loop_summary(body: list, num_warps: int) -> dict:
    c = sass.counts(body)
    pick = lambda *prefixes: {op: v for op, v in sorted(c.items()) if op.startswith(prefixes)}  # noqa: E731
    return {"instructions": c["total"], "tensor": pick("HGMMA", "HMMA"), "loads": pick("LDG", "LDGSTS", "UTMALDG"),
            "mufu": pick("MUFU"), "tensor_flop": sass.tensor_flop(body, num_warps)}


def report_row(cfg, use_hints: bool = True) -> dict:
    row = {"name": cfg.name, "kernel": cfg.kernel.__name__, "num_warps": cfg.num_warps,
           "num_stages": cfg.num_stages, "constexprs": {k: str(v) for k, v in cfg.constexprs.items()},
           "hints": use_hints}
    start = time.perf_counter()
    try:
        code = sass.compile_config(cfg, use_hints=use_hints)
        row.update(registers=code.registers, spill_stores=code.spill_stores, spill_loads=code.spill_loads,
                   stack_bytes=code.stack_bytes, shared_bytes=code.shared_bytes)
        row["violations"] = sass.gate(cfg, code)
        loops = sass.key_loops(code.instructions)
        row["key_loops"] = [loop_summary(body, cfg.num_warps) for body in loops]
        work = sass.tile_work(cfg)
        if work and loops:
            main = min(loops, key=len)
            row["estimate"] = estimate(main, cfg.num_warps, work, cfg.constexprs["HEAD_DIM"], cfg.constexprs["GROUP"])
        row["error"] = None
    except Exception as exc:  # one failing configuration must not hide the others' report
        row["error"] = f"{type(exc).__name__}: {str(exc).strip()[-800:]}"
        row["violations"] = [row["error"]]
    row["gate"] = "pass" if not row["violations"] else "FAIL"
    if not row.get("error"):
        row["decode_shapes"] = decode_shapes(row)
    row["compile_s"] = round(time.perf_counter() - start, 2)
    return row


def decode_shapes(row: dict) -> list[dict]:
    """The benchmark decode shapes on an H100/H200-sized GPU under this configuration (bf16 d128 only)."""
    from cattn.launch import MIN_SPLIT_TOKENS
    est = row.get("estimate") or {}
    if row["kernel"] != "paged_decode_kernel" or "kv_bytes_per_s" not in est or "d128" not in row["name"] \
            or "bf16" not in row["name"]:
        return []
    resident = ctas_per_sm(row["registers"], row["num_warps"], row["shared_bytes"])
    out = []
    for name, batch, kv_len in DECODE_SHAPES:   # the launcher's split rule, with SMS multiprocessors
        want = -(-2 * SMS // (batch * 8))
        splits = max(1, min(want, -(-kv_len // MIN_SPLIT_TOKENS)))
        out.append({"shape": name, "splits": splits, "ctas_per_sm": resident,
                    **decode_shape(est["kv_bytes_per_s"], batch * 8 * splits, resident)})
    return out


def _row(index: int) -> dict:
    return report_row(shipped_configs()[index], USE_HINTS)


def compile_all(indices: list[int], jobs: int) -> list[dict]:
    """Compile into a fresh cache, so that every configuration runs ptxas and logs it."""
    with tempfile.TemporaryDirectory() as cache:
        os.environ["TRITON_CACHE_DIR"] = cache
        if jobs <= 1:
            return [_row(i) for i in indices]
        with ProcessPoolExecutor(jobs, mp_context=get_context("fork")) as pool:   # workers inherit the kernels
            return list(pool.map(_row, indices))


def flat(row: dict) -> dict:
    loop = min(row.get("key_loops") or [{}], key=lambda x: x.get("instructions", 1 << 30))
    est = row.get("estimate") or {}
    merit = est.get("tflops_calibrated")
    if merit is None and est.get("kv_bytes_per_s"):
        merit = est["kv_bytes_per_s"] / 1e12
    return dict(row, loops=len(row.get("key_loops") or []), instr=loop.get("instructions"),
                tensor=" ".join(f"{v}x{k.split('.')[1]}" for k, v in loop.get("tensor", {}).items()) or "-",
                cp16=sum(v for k, v in loop.get("loads", {}).items() if k.startswith("LDGSTS") and k.endswith("128")),
                ex2=loop.get("mufu", {}).get("MUFU.EX2"), bound=est.get("bound"), merit=merit,
                unit="TFLOP/s" if est.get("tflops_calibrated") is not None else ("TB/s" if merit else ""))


COLUMNS = [("name", "configuration", "s"), ("num_warps", "warps", "d"), ("num_stages", "st", "d"),
           ("registers", "regs", "d"), ("shared_bytes", "smem B", "d"), ("spill_stores", "spill B", "d"),
           ("loops", "loops", "d"), ("instr", "instr/tile", "d"), ("tensor", "tensor instr/tile", "s"),
           ("cp16", "cp.async16", "d"), ("ex2", "EX2", "d"), ("bound", "bound", "s"), ("merit", "estimate", ".2f"),
           ("unit", "unit", "s"), ("gate", "gate", "s")]


def main(argv=None) -> int:
    global USE_HINTS
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", help="JSON path (default: compile_sm90.json in the results folder of bench.common)")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="parallel compiles")
    parser.add_argument("--only", default="", help="comma-separated substrings of configuration names")
    parser.add_argument("--no-hints", action="store_true", help="compile without the runtime's specialisation")
    args = parser.parse_args(argv)
    USE_HINTS = not args.no_hints
    indices = [i for i, c in enumerate(shipped_configs())
               if not args.only or any(s in c.name for s in args.only.split(","))]
    start = time.perf_counter()
    rows = compile_all(indices, args.jobs)
    wall = time.perf_counter() - start
    print(format_table([flat(r) for r in rows], COLUMNS))
    for row in rows:
        for v in row["violations"]:
            print(f"GATE {row['name']}: {v}", file=sys.stderr)
    for row in rows:
        for shape in row.get("decode_shapes", []):
            print(f"{row['name']} on {shape['shape']}: {shape['splits']} splits, {shape['ctas']} CTAs on "
                  f"{shape['slots']} slots ({shape['ctas_per_sm']}/SM, {shape['waves']} waves); the SMs could consume "
                  f"{shape['sm_kv_bytes_per_s'] / 1e12:.2f} TB/s of K+V: "
                  f"{'memory-bound' if shape['memory_bound'] else 'NOT memory-bound'} (estimate)")
    print(f"\n{len(rows)} configurations for sm_{sass.ARCH} (triton {triton.__version__}) in {wall:.1f} s; "
          f"{sum(r['gate'] != 'pass' for r in rows)} fail the gate. The estimates are static-code estimates, "
          "not measurements (bench/pipe_model.py).")
    path = write_json("compile_sm90.json", {"target": f"cuda sm_{sass.ARCH}", "triton": triton.__version__,
                                            "hints": USE_HINTS, "wall_s": round(wall, 1), "configs": rows},
                      path=args.out or results_dir() / "compile_sm90.json")
    print(f"wrote {path}")
    return 1 if any(r["gate"] != "pass" for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
