"""Tune the tile configurations of this GPU: time every candidate that passes the machine-code gate on
the benchmark shapes, within a time budget, and write ``cattn/configs/<device>.json``.

    python -m bench.tune [--budget-s 150] [--out DIR]     # on a GPU
    python -m bench.tune --gate-only                      # anywhere: which candidates pass the gate

Problems tuned (bf16, GQA 32/8, head_dim 128, page 16, the shapes of `bench.kernels`):
prefill/extend on "extend q512 kv16K" and decode on "decode B32 kv16K" and "decode B8 kv64K"
(summed time). The rule's own configuration is always a candidate, so the tuned entry is never
slower than the rule on these shapes; the launchers use the file on this device only and fall
back to the rule for every other problem. Each candidate's time is recorded in the file.
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
import contextlib  # noqa: E402
import json  # noqa: E402
import time  # noqa: E402
from concurrent.futures import ProcessPoolExecutor  # noqa: E402
from multiprocessing import get_context  # noqa: E402

import torch  # noqa: E402

from cattn import configs, launch  # noqa: E402
from cattn.configs import TileConfig  # noqa: E402

DTYPE, HEAD_DIM, GROUP = torch.bfloat16, 128, 4
SHAPES = {"prefill": ["extend q512 kv16K"], "decode": ["decode B32 kv16K", "decode B8 kv64K"]}


def candidates(kind: str) -> list[TileConfig]:
    """The search space, the rule's configuration first."""
    rule = (launch.rule_prefill_config if kind == "prefill" else launch.rule_decode_config)(HEAD_DIM, GROUP, DTYPE)
    if kind == "prefill":
        space = [TileConfig(r, n, w, s) for r, w in ((128, 8), (64, 4)) for n in (32, 64, 128) for s in (2, 3)]
    else:
        space = [TileConfig(16, n, w, s) for n in (32, 64, 128) for w in (4, 8) for s in (2, 3, 4)]
    return [rule] + [c for c in space if c != rule]


def _gate_one(job: tuple[str, TileConfig]) -> list[str]:
    kind, cfg = job
    shipped = launch.attention_config(kind, DTYPE, HEAD_DIM, GROUP, cfg, name=f"{kind}_{cfg}")
    try:
        return sass.gate(shipped, sass.compile_config(shipped))
    except Exception as exc:  # noqa: BLE001 - a candidate that does not compile is rejected
        return [f"{type(exc).__name__}: {str(exc)[-200:]}"]


@contextlib.contextmanager
def _compiling():
    """TRITON_INTERPRET=0 while the gate's workers start: they compile for sm_90, which the interpreter
    never does, even when this process runs its kernels under it (bench.gpu_check's dry run)."""
    before = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "0"
    try:
        yield
    finally:
        if before is None:
            del os.environ["TRITON_INTERPRET"]
        else:
            os.environ["TRITON_INTERPRET"] = before


def gated(jobs: int, limit: int | None = None) -> dict[str, list[TileConfig]]:
    """The candidates of each kernel that pass the gate (compiled in parallel); only the first ``limit``
    of each kernel (the rule's first) when given."""
    todo = [(kind, cfg) for kind in SHAPES for cfg in candidates(kind)[:limit]]
    with _compiling(), ProcessPoolExecutor(jobs, mp_context=get_context("spawn")) as pool:
        verdicts = list(pool.map(_gate_one, todo))
    passing = {kind: [] for kind in SHAPES}
    for (kind, cfg), bad in zip(todo, verdicts):
        print(f"  gate {'pass' if not bad else 'FAIL'} {kind} {cfg}{'' if not bad else ': ' + bad[0]}", flush=True)
        if not bad:
            passing[kind].append(cfg)
    return passing


def time_candidates(kind: str, cands: list[TileConfig], deadline: float, shapes: list, device: torch.device
                    ) -> list[dict]:
    """Each candidate's summed time on ``shapes`` (`bench.kernels.Shape`), until ``deadline`` (the first
    candidate, the rule's, always runs)."""
    from bench import kernels

    inputs = [kernels.make_inputs(shape, DTYPE, device) for shape in shapes]
    rows = []
    for cfg in cands:
        if time.monotonic() > deadline and rows:
            break
        total = 0.0
        for inp in inputs:
            out = torch.empty_like(inp.q)
            fn = lambda: launch.launch_paged_attention(  # noqa: E731
                inp.q, inp.k_cache, inp.v_cache, inp.block_table, inp.kv_lens, inp.cu_seqlens_q, inp.rope,
                sm_scale=HEAD_DIM ** -0.5, causal=True, out=out, max_q_len=inp.shape.q_len, config=cfg)
            total += kernels.time_ms(fn, device)
        rows.append({"config": cfg.__dict__, "ms": round(total, 4)})
        print(f"  {kind} {cfg}: {total:.3f} ms", flush=True)
    return rows


def benchmark_shapes() -> dict[str, list]:
    """The `bench.kernels` shapes of each kernel, as ``SHAPES`` names them."""
    from bench import kernels

    return {kind: [next(s for s in kernels.GPU_SHAPES if s.name == name) for name in names]
            for kind, names in SHAPES.items()}


def run(budget_s: float, out_dirs: list[Path], jobs: int, *, device: torch.device | None = None,
        shapes: dict[str, list] | None = None, limit: int | None = None) -> dict:
    """Tune on ``device`` (default: this GPU) and write the file into each of ``out_dirs``; returns its
    payload. ``shapes`` ({kernel: [Shape]}, default `benchmark_shapes`) and ``limit`` (candidates gated per
    kernel) are for a dry run: tiny shapes, the rule's configuration only."""
    from bench.common import device_name, write_json

    start = time.monotonic()
    device = device or torch.device("cuda")
    shapes = shapes or benchmark_shapes()
    passing = gated(jobs, limit)
    deadline = start + budget_s
    payload = {"device": device_name(device), "triton": __import__("triton").__version__,
               "torch": torch.__version__, "problem": {"dtype": "bf16", "head_dim": HEAD_DIM, "group": GROUP},
               "shapes": {kind: [s.name for s in shapes[kind]] for kind in SHAPES}, "timings": {}}
    for i, (kind, cands) in enumerate(passing.items()):
        # an equal share of what is left for each kernel: prefill's candidates cannot use up decode's time
        share = (deadline - time.monotonic()) / (len(passing) - i)
        rows = time_candidates(kind, cands, time.monotonic() + share, shapes[kind], device)
        payload["timings"][kind] = rows
        if rows:
            best = min(rows, key=lambda r: r["ms"])
            payload[kind] = {configs.problem_key(DTYPE, HEAD_DIM, GROUP): best["config"]}
    configs.parse(payload, "tuned payload")     # what the launchers will read back
    name = configs.device_file_name(payload["device"])
    for d in dict.fromkeys(Path(d) for d in out_dirs):
        write_json(name, payload, path=d / name)
    configs.load.cache_clear()
    return payload


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--budget-s", type=float, default=150, help="stop timing new candidates after this")
    parser.add_argument("--out", action="append", help="folder to write <device>.json into (repeatable; "
                                                       "default: cattn/configs, the shipped location)")
    parser.add_argument("--jobs", type=int, default=min(16, os.cpu_count() or 1), help="parallel gate compiles")
    parser.add_argument("--gate-only", action="store_true", help="only print which candidates pass the gate")
    args = parser.parse_args(argv)
    if args.gate_only:
        passing = gated(args.jobs)
        print({k: [str(c) for c in v] for k, v in passing.items()})
        return 0
    if not torch.cuda.is_available():
        print("bench.tune times kernels on a GPU; without one, `--gate-only` lists the candidates that pass the gate")
        return 2
    payload = run(args.budget_s, [Path(d) for d in args.out or [configs.HERE]], args.jobs)
    print(json.dumps({k: payload.get(k) for k in ("device", "prefill", "decode")}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
