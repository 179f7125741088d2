"""The replay experiments of docs/replay.md: the long-context configuration and the paper's, every
policy, the ablation of each direction of the ``value`` policy, what being told the future is worth,
other seeds and disk bandwidths, as tables and one JSON.

    python -m bench.replay_long                 # all of it (about 20 minutes on one core)
    python -m bench.replay_long --quick         # 15 minutes of the long trace, no paper run (seconds)
    python -m bench.replay_long --tables bench/results/replay_long.json   # the docs' tables, from the JSON

Writes ``replay_long.json`` in the results folder (``$OUT``, ``$CATTN_RESULTS_DIR``, ``./cattn-results``
or the user cache folder; never the source tree; ``--out`` names a path), with cattn's version, commit and
time. The committed ``bench/results/replay_long.json`` is such a run, copied there.
"""
from __future__ import annotations

if __package__ in (None, ""):   # run by path: import `cattn` and `bench` from this checkout, as `python -m` does
    import pathlib
    import sys
    # the checkout's root, and not bench/ itself: bench/kernels.py would shadow the `kernels` package
    here = pathlib.Path(__file__).resolve().parent
    sys.path[:] = [str(here.parent)] + [p for p in sys.path if pathlib.Path(p or ".").resolve() != here]

import argparse
import json
import time
from pathlib import Path

from cattn.replay.costmodel import CostModel, Hardware, model_shape
from cattn.replay.longctx import LongContextConfig, long_context_trace
from cattn.replay.oracle import TOLD as ORACLE_TOLD
from cattn.replay.oracle import ToldValuePolicy
from cattn.replay.report import IDLE_BUCKETS, summarize, write_json
from cattn.replay.sim import simulate, value_options
from cattn.replay.sim_tiers import EXCLUSIVE, EXCLUSIVE_PARTIAL
from cattn.replay.workload import ArrivalConfig, SyntheticConfig, schedule, synthetic_conversations
from cattn.store.policy.value import ValueConfig

GB, TB = 10**9, 10**12
POLICIES = ("recompute", "lru", "fifo", "scheduler", "value", "belady-fair", "belady")
ABLATIONS = (  # (row name, value options, partial prefetch)
    ("value (all kept directions)", {}, True),
    ("- partial prefetch", {}, False),
    ("- return estimate in DRAM", {"dram_return": False}, True),
    ("- return estimate on disk", {"disk_return": False}, True),
    ("- first turns leave DRAM first", {"first_turns_first": False}, True),
    ("- queued prefetch", {"prefetch_queued": False}, True),
    ("+ own gaps", {"own_gaps": True}, True),
    ("- value per byte", {"value_per_byte": False}, True),
    ("+ hazard (rate of return now) in DRAM", {"hazard": True}, True),
    ("+ return within 60 s (not at all)", {"horizon_s": 60.0}, True),
    ("+ speculative prefetch", {"speculative": True}, True),
)
TOLD = (("value told the return odds per turn count (hindsight)", "odds"),
        ("value told which sessions return (not when)", "which"), ("value told when each returns", "when"))
SEED_POLICIES = ("lru", "scheduler", "value", "belady-fair")


def run(jobs, cost, dram, disk, policy, partial, options=None, label=None) -> dict:
    """One replay; ``policy`` is a name, or one of `cattn.replay.oracle.TOLD` for the told ``value`` policy."""
    t0 = time.perf_counter()
    tiers = EXCLUSIVE_PARTIAL if partial else EXCLUSIVE
    if policy in ORACLE_TOLD:
        told = ToldValuePolicy(jobs, policy, ValueConfig(**value_options(cost, options)))
        res = simulate(jobs, told, dram, disk, cost, tiers=tiers)
    else:
        res = simulate(jobs, policy, dram, disk, cost, tiers=tiers, policy_options=options)
    row = summarize(res, cost)
    row.update(label=label or row["policy"], partial_prefetch=partial, options=options or {},
               sim_wall_s=time.perf_counter() - t0)
    print(f"  {row['label']:<44} reuse {row['reuse']:6.1%}  DRAM {row['dram_reuse']:6.1%}  "
          f"GPU saved {row['gpu_saved']:6.1%}  ({row['sim_wall_s']:.0f} s)", flush=True)
    return row


def with_bound_share(rows: list[dict], fair: dict) -> list[dict]:
    for r in rows:
        r["share_of_fair_saving"] = r["gpu_saved"] / fair["gpu_saved"] if fair["gpu_saved"] else 0.0
    return rows


def _fair(rows: list[dict]) -> dict:
    return next(r for r in rows if r["policy"] == "belady-fair")


def markdown(rows: list[dict], lengths: bool = False) -> str:
    head = ["policy", "reuse", "in DRAM", "GPU saved", "of fair bound", "turn hit", "DRAM", "recomputed",
            "TTFT mean", "p99", "queue wait"]
    if lengths:
        head += ["DRAM hit <2K", "2-8K", "8-32K", ">=32K"]
    out = [_row(head), "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["label"], f"{r['reuse']:.1%}", f"{r['dram_reuse']:.1%}", f"{r['gpu_saved']:.1%}",
                 f"{r['share_of_fair_saving']:.0%}", f"{r['hit_rate']:.1%}", f"{r['dram_hit_rate']:.1%}",
                 f"{r['recomputed_rate']:.1%}", f"{1000 * r['ttft_mean_s']:.0f} ms", f"{1000 * r['ttft_p99_s']:.0f} ms",
                 f"{r['queue_wait_mean_s']:.2f} s"]
        if lengths:
            cells += [f"{b['dram_hit_rate']:.0%}" for b in r["by_history_length"].values()]
        out.append(_row(cells))
    return "\n".join(out)


def _row(cells) -> str:
    return "| " + " | ".join(cells) + " |"


def idle_markdown(rows: list[dict]) -> str:
    """Where the saving comes from: GPU time saved (share of recomputing everything) and DRAM reuse by
    how long the session was idle, and how DRAM hits were found (kept since the save, or prefetched)."""
    head = ["policy", "GPU saved"] + [f"idle {name}: saved, in DRAM" for name, _, _ in IDLE_BUCKETS] + \
        ["DRAM hits kept", "prefetched", "disk written"]
    out = [_row(head), "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["label"], f"{r['gpu_saved']:.1%}"]
        cells += [f"{b['gpu_saved']:.1%}, {b['dram_reuse']:.0%}" for b in r["by_idle_time"].values()]
        cells += [f"{r['store_dram_kept']:,}", f"{r['store_dram_prefetched']:,}",
                  f"{r['store_disk_write_bytes'] / TB:.1f} TB"]
        out.append(_row(cells))
    return "\n".join(out)


def seeds_markdown(rows: list[dict]) -> str:
    head = ["seed", "disk", "value: of fair bound", "told odds", "told which", "told when", "scheduler", "value in DRAM",
            "LRU in DRAM", "value - LRU"]
    out = [_row(head), "|" + "---|" * len(head)]
    for r in rows:
        share = r["share_of_fair_saving"]
        out.append(_row([str(r["seed"]), f"{r['disk_bytes'] / TB:g} TB", f"{share['value']:.1%}",
                         f"{share['odds']:.1%}", f"{share['which']:.1%}", f"{share['when']:.1%}", f"{share['scheduler']:.1%}",
                         f"{r['dram_reuse']['value']:.1%}", f"{r['dram_reuse']['lru']:.1%}",
                         f"{100 * (r['dram_reuse']['value'] - r['dram_reuse']['lru']):.1f} points"]))
    return "\n".join(out)


def _long_trace(duration: float, seed: int, gpus: int, disk_gbps: float = 5.0):
    jobs = long_context_trace(LongContextConfig(duration_s=duration, seed=seed))
    return jobs, CostModel(model_shape("llama3.1-8b"), Hardware(gpus=gpus, disk_read_bytes_per_s=disk_gbps * GB))


def long_context(duration: float, seed: int, gpus: int, disk: int) -> dict:
    jobs, cost = _long_trace(duration, seed, gpus)
    dram = 128 * GB
    out = {}
    for partial in (False, True):
        print(f"long context, {'partial prefetch' if partial else 'whole reads only'}, disk {disk / TB:g} TB")
        rows = [run(jobs, cost, dram, disk, p, partial) for p in POLICIES]
        out["partial" if partial else "whole"] = with_bound_share(rows, _fair(rows))
    fair = _fair(out["partial"])
    print("ablation")
    out["ablation"] = with_bound_share([run(jobs, cost, dram, disk, "value", partial, opts, name)
                                        for name, opts, partial in ABLATIONS], fair)
    print("told the future")
    out["told"] = with_bound_share([run(jobs, cost, dram, disk, told, True, label=name) for name, told in TOLD], fair)
    out["trace"] = dict(turns=len(jobs), sessions=len({j.session for j in jobs}), duration_s=duration, seed=seed)
    out["config"] = dict(model="llama3.1-8b", gpus=gpus, dram_bytes=dram, disk_bytes=disk)
    return out


def other_seeds(seeds: list[int], gpus: int) -> list[dict]:
    """The headline shares on other traces (partial prefetch), 10 TB and 1 TB of disk."""
    out = []
    for seed in seeds:
        jobs, cost = _long_trace(3600.0, seed, gpus)
        for disk in (10 * TB, 1 * TB):
            print(f"seed {seed}, disk {disk / TB:g} TB")
            rows = [run(jobs, cost, 128 * GB, disk, p, True) for p in (*SEED_POLICIES, *ORACLE_TOLD)]
            fair = _fair(rows)
            key = {**{r["policy"]: r for r in rows[:len(SEED_POLICIES)]}, **dict(zip(ORACLE_TOLD, rows[len(SEED_POLICIES):]))}
            out.append(dict(seed=seed, disk_bytes=disk, gpu_saved={k: r["gpu_saved"] for k, r in key.items()},
                            share_of_fair_saving={k: r["gpu_saved"] / fair["gpu_saved"] for k, r in key.items()},
                            dram_reuse={k: r["dram_reuse"] for k, r in key.items()}))
    return out


def disk_bandwidth(seed: int, gpus: int, gbps: tuple[float, ...] = (10.0, 20.0)) -> list[dict]:
    """How much of the gap is disk bandwidth: the same trace with faster disks (10 TB, partial prefetch)."""
    out = []
    for bw in gbps:
        jobs, cost = _long_trace(3600.0, seed, gpus, disk_gbps=bw)
        print(f"disk reads {bw:g} GB/s")
        rows = [run(jobs, cost, 128 * GB, 10 * TB, p, True, label=f"{p}, {bw:g} GB/s")
                for p in ("lru", "value", "belady-fair")]
        out.extend(with_bound_share(rows, _fair(rows)))
    return out


def _paper_trace(sessions: int, seed: int):
    return schedule(synthetic_conversations(SyntheticConfig(num_sessions=sessions, seed=seed)),
                    ArrivalConfig(rate=3.0, think_mean=60.0, seed=seed))


def paper(sessions: int, seeds: list[int]) -> dict:
    """The paper's configuration: every policy on seed 0, and value against the scheduler on ``seeds``."""
    jobs = _paper_trace(sessions, 0)
    cost = CostModel(model_shape("llama2-13b"), Hardware())
    print(f"paper's configuration ({sessions} sessions)")
    rows = [run(jobs, cost, 128 * GB, 10 * TB, p, False) for p in ("recompute", "lru", "scheduler", "value",
                                                                      "belady-fair", "belady")]
    rows.append(run(jobs, cost, 128 * GB, 10 * TB, "value", True, label="value + partial prefetch"))
    against = []
    for seed in seeds:
        if seed == 0:
            pair = {r["policy"]: r for r in rows[2:4]}  # run above
        else:
            print(f"paper's configuration, seed {seed}")
            jobs = _paper_trace(sessions, seed)
            pair = {p: run(jobs, cost, 128 * GB, 10 * TB, p, False) for p in ("scheduler", "value")}
        against.append(dict(seed=seed, **{f"{p}_{k}": r[k] for p, r in pair.items()
                                          for k in ("gpu_saved", "dram_reuse", "dram_hit_rate")}))
    return dict(rows=with_bound_share(rows, _fair(rows)), seeds=against,
                config=dict(model="llama2-13b", gpus=4, dram_bytes=128 * GB, disk_bytes=10 * TB, sessions=sessions))


def paper_seeds_markdown(rows: list[dict]) -> str:
    head = ["seed", "GPU saved: scheduler", "value", "value - scheduler", "in DRAM: scheduler", "value",
            "DRAM hit: scheduler", "value"]
    out = [_row(head), "|" + "---|" * len(head)]
    for r in rows:
        out.append(_row([str(r["seed"]), f"{r['scheduler_gpu_saved']:.2%}", f"{r['value_gpu_saved']:.2%}",
                         f"{100 * (r['value_gpu_saved'] - r['scheduler_gpu_saved']):+.2f} points",
                         f"{r['scheduler_dram_reuse']:.1%}", f"{r['value_dram_reuse']:.1%}",
                         f"{r['scheduler_dram_hit_rate']:.1%}", f"{r['value_dram_hit_rate']:.1%}"]))
    return "\n".join(out)


def tables(payload: dict) -> str:
    """Every table of docs/replay.md's long-context sections, from the JSON."""
    parts = []
    for key in ("long_context", "long_context_small_disk"):
        if key in payload:
            for part in ("whole", "partial"):
                parts.append(f"{key}, {part}\n" + markdown(payload[key][part], lengths=True))
            parts.append(f"{key}, ablation\n" + markdown(payload[key]["ablation"]))
            rows = [r for r in payload[key]["partial"] if r["policy"] in ("lru", "scheduler", "value", "belady-fair")]
            parts.append(f"{key}, told the future\n" + markdown([*rows, *payload[key]["told"]]))
            parts.append(f"{key}, by idle time\n" + idle_markdown(rows))
    if "seeds" in payload:
        parts.append("seeds (partial prefetch)\n" + seeds_markdown(payload["seeds"]))
    if "disk_bandwidth" in payload:
        parts.append("disk bandwidth (seed 0, 10 TB, partial prefetch)\n" + markdown(payload["disk_bandwidth"]))
    if "paper" in payload:
        parts.append("paper\n" + markdown(payload["paper"]["rows"]))
        parts.append("paper, seeds\n" + paper_seeds_markdown(payload["paper"]["seeds"]))
    return "\n\n".join(parts)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="15 minutes of the long trace, no paper run")
    p.add_argument("--gpus", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--other-seeds", default="1,2", help="comma-separated seeds for the headline shares")
    p.add_argument("--out", type=Path, default=None, help="the JSON (default: replay_long.json in the results folder)")
    p.add_argument("--tables", type=Path, default=None, help="print the tables of this JSON and exit")
    args = p.parse_args()
    if args.tables is not None:
        print(tables(json.loads(args.tables.read_text())))
        return
    payload = dict(long_context=long_context(900.0 if args.quick else 3600.0, args.seed, args.gpus, 10 * TB))
    if not args.quick:
        payload["long_context_small_disk"] = long_context(3600.0, args.seed, args.gpus, 1 * TB)
        payload["seeds"] = other_seeds([int(s) for s in args.other_seeds.split(",") if s.strip()], args.gpus)
        payload["disk_bandwidth"] = disk_bandwidth(args.seed, args.gpus)
        payload["paper"] = paper(17000, [0, 1, 2, 3])
    from bench.common import results_dir
    path = write_json(args.out or results_dir() / "replay_long.json", payload)
    print("\n" + tables(payload))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
