"""The replay with the host tiers in 8 bits: the long-context configuration (Llama-3.1-8B, and Llama-2-13B's
shape at the same 128K context) and the paper's (Llama-2-13B, 4 GPUs), each with the lossless format and
with int8, where the cost model's host bytes per token (DRAM, disk, disk reads, PCIe) are the 8-bit
format's (`cattn.replay.costmodel.CostModel.kv_format`) and GPU pages stay in the model dtype.

    python -m bench.replay_formats              # both configurations (about 15 minutes on one core)
    python -m bench.replay_formats --quick      # 15 minutes of the long trace, no paper run
    python -m bench.replay_formats --tables bench/results/replay_formats.json

Writes ``replay_formats.json`` in the results folder (never the source tree unless ``--out`` says so).
"""
from __future__ import annotations

if __package__ in (None, ""):   # run by path: import `cattn` and `bench` from this checkout, as `python -m` does
    import pathlib
    import sys
    here = pathlib.Path(__file__).resolve().parent
    sys.path[:] = [str(here.parent)] + [p for p in sys.path if pathlib.Path(p or ".").resolve() != here]

import argparse
import json
from dataclasses import replace
from pathlib import Path

from bench.replay_long import GB, TB, run
from cattn.replay.costmodel import CostModel, Hardware, model_shape
from cattn.replay.longctx import LongContextConfig, long_context_trace
from cattn.replay.report import write_json
from cattn.replay.workload import ArrivalConfig, SyntheticConfig, schedule, synthetic_conversations

FORMATS = ("lossless", "int8")
LONG_POLICIES = ("lru", "scheduler", "value", "belady-fair")
PAPER_POLICIES = ("lru", "scheduler", "value")


def long_context(duration: float, seed: int, gpus: int) -> list[dict]:
    """The long-context trace (partial prefetch, 128 GB DRAM, 10 TB of disk at 5 GB/s), both models, both formats."""
    jobs = long_context_trace(LongContextConfig(duration_s=duration, seed=seed))
    shapes = [model_shape("llama3.1-8b"),
              replace(model_shape("llama2-13b"), name="llama2-13b-128k", max_context=131072)]
    rows = []
    for shape in shapes:
        for fmt in FORMATS:
            cost = CostModel(shape, Hardware(gpus=gpus, disk_read_bytes_per_s=5 * GB), kv_format=fmt)
            print(f"long context, {shape.name}, {fmt} ({cost.host_kv_bytes_per_token:,.0f} host bytes per token)")
            for policy in LONG_POLICIES:
                rows.append(dict(run(jobs, cost, 128 * GB, 10 * TB, policy, True), model=shape.name, kv_format=fmt,
                                 host_bytes_per_token=cost.host_kv_bytes_per_token))
    return rows


def paper(sessions: int) -> list[dict]:
    """The paper's configuration (whole reads, as the paper's store does), both formats."""
    jobs = schedule(synthetic_conversations(SyntheticConfig(num_sessions=sessions, seed=0)),   # as bench.replay_long's
                    ArrivalConfig(rate=3.0, think_mean=60.0, seed=0))
    rows = []
    for fmt in FORMATS:
        cost = CostModel(model_shape("llama2-13b"), Hardware(), kv_format=fmt)
        print(f"paper's configuration, {fmt}")
        for policy in PAPER_POLICIES:
            rows.append(dict(run(jobs, cost, 128 * GB, 10 * TB, policy, False), model="llama2-13b", kv_format=fmt,
                             host_bytes_per_token=cost.host_kv_bytes_per_token))
    return rows


def _row(cells) -> str:
    return "| " + " | ".join(cells) + " |"


def markdown(rows: list[dict]) -> str:
    head = ["model", "policy", "format", "host bytes/token", "reuse", "in DRAM", "GPU saved", "gain", "TTFT mean",
            "p99"]
    out = [_row(head), "|" + "---|" * len(head)]
    lossless = {(r["model"], r["label"]): r for r in rows if r["kv_format"] == "lossless"}
    for r in rows:
        base = lossless[(r["model"], r["label"])]
        gain = "" if r is base else f"{100 * (r['gpu_saved'] - base['gpu_saved']):+.1f} points"
        out.append(_row([r["model"], r["label"], r["kv_format"], f"{r['host_bytes_per_token']:,.0f}",
                         f"{r['reuse']:.1%}", f"{r['dram_reuse']:.1%}", f"{r['gpu_saved']:.1%}", gain,
                         f"{1000 * r['ttft_mean_s']:.0f} ms", f"{1000 * r['ttft_p99_s']:.0f} ms"]))
    return "\n".join(out)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="15 minutes of the long trace, no paper run")
    p.add_argument("--gpus", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=None,
                   help="the JSON (default: replay_formats.json in the results folder)")
    p.add_argument("--tables", type=Path, default=None, help="print the tables of this JSON and exit")
    args = p.parse_args()
    if args.tables is not None:
        payload = json.loads(args.tables.read_text())
    else:
        payload = dict(long_context=long_context(900.0 if args.quick else 3600.0, args.seed, args.gpus))
        if not args.quick:
            payload["paper"] = paper(17000)
        from bench.common import results_dir
        print(f"wrote {write_json(args.out or results_dir() / 'replay_formats.json', payload)}")
    for key in ("long_context", "paper"):
        if key in payload:
            print(f"\n{key}\n{markdown(payload[key])}")


if __name__ == "__main__":
    main()
