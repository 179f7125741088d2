"""The replay experiments of docs/replay.md: the long-context configuration and the paper's, every
policy and the ablation of each direction of the ``value`` policy, as tables and one JSON.

    python -m bench.replay_long                 # all of it (minutes on one core)
    python -m bench.replay_long --quick         # 15 minutes of the long trace, no paper run (seconds)

Writes ``bench/results/replay_long.json`` (or under ``$OUT``), with cattn's version, commit and time.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

from cattn.replay.costmodel import CostModel, Hardware, model_shape
from cattn.replay.longctx import LongContextConfig, long_context_trace
from cattn.replay.report import summarize, write_json
from cattn.replay.sim import simulate
from cattn.replay.tiers import EXCLUSIVE, EXCLUSIVE_PARTIAL
from cattn.replay.workload import ArrivalConfig, SyntheticConfig, schedule, synthetic_conversations

GB, TB = 10**9, 10**12
POLICIES = ("recompute", "lru", "fifo", "scheduler", "value", "belady-fair", "belady")
ABLATIONS = (  # (row name, value options, partial prefetch)
    ("value (all kept directions)", {}, True),
    ("- partial prefetch", {}, False),
    ("- return estimate in DRAM", {"dram_return": False}, True),
    ("- return estimate on disk", {"disk_return": False}, True),
    ("- queued prefetch", {"prefetch_queued": False}, True),
    ("+ own gaps", {"own_gaps": True}, True),
    ("- value per byte", {"value_per_byte": False}, True),
    ("+ hazard (rate of return now) in DRAM", {"hazard": True}, True),
    ("+ speculative prefetch", {"speculative": True}, True),
)


def run(jobs, cost, dram, disk, policy, partial, options=None, label=None) -> dict:
    t0 = time.perf_counter()
    res = simulate(jobs, policy, dram, disk, cost, tiers=EXCLUSIVE_PARTIAL if partial else EXCLUSIVE,
                   policy_options=options)
    row = summarize(res, cost)
    row.update(label=label or policy, partial_prefetch=partial, options=options or {},
               sim_wall_s=time.perf_counter() - t0)
    print(f"  {row['label']:<40} reuse {row['reuse']:6.1%}  DRAM {row['dram_reuse']:6.1%}  "
          f"GPU saved {row['gpu_saved']:6.1%}  ({row['sim_wall_s']:.0f} s)", flush=True)
    return row


def with_bound_share(rows: list[dict], fair: dict) -> list[dict]:
    for r in rows:
        r["share_of_fair_saving"] = r["gpu_saved"] / fair["gpu_saved"] if fair["gpu_saved"] else 0.0
    return rows


def markdown(rows: list[dict], lengths: bool = False) -> str:
    head = ["policy", "reuse", "in DRAM", "GPU saved", "of fair bound", "turn hit", "DRAM", "recomputed",
            "TTFT mean", "p99", "queue wait"]
    if lengths:
        head += ["DRAM hit <2K", "2-8K", "8-32K", ">=32K"]
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["label"], f"{r['reuse']:.1%}", f"{r['dram_reuse']:.1%}", f"{r['gpu_saved']:.1%}",
                 f"{r['share_of_fair_saving']:.0%}", f"{r['hit_rate']:.1%}", f"{r['dram_hit_rate']:.1%}",
                 f"{r['recomputed_rate']:.1%}", f"{1000 * r['ttft_mean_s']:.0f} ms", f"{1000 * r['ttft_p99_s']:.0f} ms",
                 f"{r['queue_wait_mean_s']:.2f} s"]
        if lengths:
            cells += [f"{b['dram_hit_rate']:.0%}" for b in r["by_history_length"].values()]
        out.append("| " + " | ".join(cells) + " |")
    return "\n".join(out)


def long_context(duration: float, seed: int, gpus: int, disk: int) -> dict:
    jobs = long_context_trace(LongContextConfig(duration_s=duration, seed=seed))
    cost = CostModel(model_shape("llama3.1-8b"), Hardware(gpus=gpus))
    dram = 128 * GB
    out = {}
    for partial in (False, True):
        print(f"long context, {'partial prefetch' if partial else 'whole reads only'}, disk {disk / TB:g} TB")
        rows = [run(jobs, cost, dram, disk, p, partial) for p in POLICIES]
        fair = next(r for r in rows if r["policy"] == "belady-fair")
        out["partial" if partial else "whole"] = with_bound_share(rows, fair)
    print("ablation")
    fair = next(r for r in out["partial"] if r["policy"] == "belady-fair")
    out["ablation"] = with_bound_share([run(jobs, cost, dram, disk, "value", partial, opts, name)
                                        for name, opts, partial in ABLATIONS], fair)
    out["trace"] = dict(turns=len(jobs), sessions=len({j.session for j in jobs}), duration_s=duration, seed=seed)
    out["config"] = dict(model="llama3.1-8b", gpus=gpus, dram_bytes=dram, disk_bytes=disk)
    return out


def paper(sessions: int) -> dict:
    jobs = schedule(synthetic_conversations(SyntheticConfig(num_sessions=sessions, seed=0)),
                    ArrivalConfig(rate=3.0, think_mean=60.0, seed=0))
    cost = CostModel(model_shape("llama2-13b"), Hardware())
    print(f"paper's configuration ({sessions} sessions)")
    rows = [run(jobs, cost, 128 * GB, 10 * TB, p, False) for p in ("recompute", "lru", "scheduler", "value",
                                                                      "belady-fair", "belady")]
    rows.append(run(jobs, cost, 128 * GB, 10 * TB, "value", True, label="value + partial prefetch"))
    fair = next(r for r in rows if r["policy"] == "belady-fair")
    return dict(rows=with_bound_share(rows, fair), config=dict(model="llama2-13b", gpus=4, dram_bytes=128 * GB,
                                                               disk_bytes=10 * TB, sessions=sessions))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="15 minutes of the long trace, no paper run")
    p.add_argument("--gpus", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=None, help="the JSON (default bench/results/replay_long.json)")
    args = p.parse_args()
    payload = dict(long_context=long_context(900.0 if args.quick else 3600.0, args.seed, args.gpus, 10 * TB))
    if not args.quick:
        payload["long_context_small_disk"] = long_context(3600.0, args.seed, args.gpus, 1 * TB)
        payload["paper"] = paper(17000)
    from bench.common import results_dir
    path = write_json(args.out or results_dir() / "replay_long.json", payload)
    for key in ("long_context", "long_context_small_disk"):
        if key in payload:
            for part in ("whole", "partial"):
                print(f"\n{key}, {part}\n" + markdown(payload[key][part], lengths=True))
            print(f"\n{key}, ablation\n" + markdown(payload[key]["ablation"]))
    if "paper" in payload:
        print("\npaper\n" + markdown(payload["paper"]["rows"]))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
