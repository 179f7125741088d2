"""One replay experiment: a trace, a cost model and capacities, run under several policies."""
from __future__ import annotations

import argparse
import warnings
from collections.abc import Sequence
from dataclasses import asdict, is_dataclass
from pathlib import Path

from cattn.replay.costmodel import CostModel
from cattn.replay.queue import Job
from cattn.replay.report import plot_hit_rate_vs_dram, plot_ttft_cdf, summarize, write_json
from cattn.replay.sim import EXCLUSIVE, TierModel, TruncationWarning, simulate
from cattn.replay.trace import read_trace, write_trace
from cattn.replay.workload import ArrivalConfig, SyntheticConfig, schedule, synthetic_conversations


def build_trace(args: argparse.Namespace) -> list[Job]:
    """The trace the arguments describe: a file, synthetic conversations, or ShareGPT's."""
    if args.trace is not None:
        jobs = read_trace(args.trace, getattr(args, "trace_format", "auto"))
    elif args.workload == "long":
        from cattn.replay.longctx import LongContextConfig, long_context_trace
        jobs = long_context_trace(LongContextConfig(seed=args.seed))
    else:
        arrivals = ArrivalConfig(rate=args.rate, process=args.arrival, burstiness=args.burstiness,
                                 think_mean=args.think, seed=args.seed)
        if args.workload == "sharegpt":
            from cattn.replay.sharegpt import token_counts
            convs = token_counts(progress=not args.no_progress)[:args.sessions]
            jobs = schedule([turns for _, turns in convs], arrivals)
        else:
            jobs = schedule(synthetic_conversations(SyntheticConfig(num_sessions=args.sessions, seed=args.seed)),
                            arrivals)
    if args.save_trace is not None:
        write_trace(jobs, args.save_trace)
    return jobs


class Experiment:
    def __init__(self, jobs: Sequence[Job], cost: CostModel, dram_bytes: int, disk_bytes: int, *,
                 ttl: float | None = None, progress: bool = True, tiers: TierModel = EXCLUSIVE):
        self.jobs, self.cost, self.dram_bytes, self.disk_bytes = list(jobs), cost, dram_bytes, disk_bytes
        self.ttl, self.progress, self.tiers = ttl, progress, tiers
        self.ttfts: dict[str, list[float]] = {}

    def _run(self, policy: str, dram_bytes: int, disk_bytes: int | None = None) -> dict:
        bar = None
        if self.progress:
            from tqdm import tqdm
            bar = tqdm(total=len(self.jobs), desc=f"{policy} @ {dram_bytes / 1e9:g} GB DRAM", unit="turn",
                       leave=False, mininterval=0.5)
        try:
            with warnings.catch_warnings():  # the command prints the truncation once, not once per run
                warnings.simplefilter("ignore", TruncationWarning)
                result = simulate(self.jobs, policy, dram_bytes,
                                  self.disk_bytes if disk_bytes is None else disk_bytes, self.cost,
                                  ttl=self.ttl if policy in ("scheduler", "value") else None,
                                  tiers=self.tiers,
                                  on_job=None if bar is None else (lambda: bar.update()))
        finally:
            if bar is not None:
                bar.close()
        if disk_bytes is None:
            self.ttfts[policy] = [r.ttft for r in result.records]
        return summarize(result, self.cost)

    def compare(self, policies: Sequence[str]) -> list[dict]:
        """One summary per policy at the configured capacities."""
        return [self._run(p, self.dram_bytes) for p in policies]

    def sweep(self, policies: Sequence[str], multiples: Sequence[float], *, scale_disk: bool = True) -> list[dict]:
        """Summaries at DRAM = multiple x the configured DRAM, for every policy; the disk scales
        with it (the configured DRAM:disk ratio) unless ``scale_disk`` is False."""
        rows = []
        for m in multiples:
            dram = int(self.dram_bytes * m)
            disk = int(self.disk_bytes * m) if scale_disk else self.disk_bytes
            for p in policies:
                rows.append(dict(self._run(p, dram, disk), dram_gb=dram / 1e9, disk_gb=disk / 1e9))
        return rows

    def save(self, args: argparse.Namespace, rows: list[dict], sweep: list[dict], **extra) -> list[Path]:
        config = {k: (str(v) if isinstance(v, Path) else asdict(v) if is_dataclass(v) else v) for k, v in vars(args).items()
                  if not k.startswith("_") and k not in ("no_progress", "func")}
        payload = dict(config=config, model=asdict(self.cost.model), hardware=asdict(self.cost.hw),
                       kv_bytes_per_token=self.cost.model.kv_bytes_per_token, kv_format=self.cost.kv_format,
                       host_kv_bytes_per_token=self.cost.host_kv_bytes_per_token,
                       trace=dict(turns=len(self.jobs), sessions=len({j.session for j in self.jobs})),
                       results=rows, sweep=sweep, **extra)
        out = [write_json(Path(args.out) / f"replay_{args.name}.json", payload)]
        Path(args.plots).mkdir(parents=True, exist_ok=True)
        if sweep:
            out.append(plot_hit_rate_vs_dram(sweep, Path(args.plots) / f"replay_{args.name}_hit_rate.png"))
        if self.ttfts:
            out.append(plot_ttft_cdf(self.ttfts, Path(args.plots) / f"replay_{args.name}_ttft.png"))
        return out
