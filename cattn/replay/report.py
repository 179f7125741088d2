"""What a replay measured: per-policy summaries, the table, the JSON and the plots."""
from __future__ import annotations

import json
import platform
import sys
from collections.abc import Sequence
from pathlib import Path

from cattn.replay.costmodel import CostModel
from cattn.replay.sim import HITS, ReplayResult, TurnRecord


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (q in [0, 100]) of a non-empty list."""
    s = sorted(values)
    return s[min(len(s) - 1, max(0, round(q / 100 * (len(s) - 1))))]


# history lengths (tokens) of the per-length breakdown
HISTORY_BUCKETS = (("<2K", 0, 2048), ("2-8K", 2048, 8192), ("8-32K", 8192, 32768), (">=32K", 32768, float("inf")))


# idle time (seconds from a session's previous turn ending to this one arriving) of the per-idle breakdown
IDLE_BUCKETS = (("<1 min", 0, 60), ("1-4 min", 60, 240), (">=4 min", 240, float("inf")))


def by_idle_time(records: Sequence[TurnRecord]) -> dict:
    """Turns with a history by how long their session was idle: turns, token-weighted reuse (all tiers,
    DRAM) and the GPU time they saved as a share of prefilling every prompt of the trace whole: where a
    policy's saving comes from."""
    ended: dict[str, float] = {}
    groups: dict[str, list[TurnRecord]] = {name: [] for name, _, _ in IDLE_BUCKETS}
    for r in records:
        if r.tier != "first" and r.session in ended:
            idle = max(0.0, r.arrival - ended[r.session])  # a trace may queue a turn before the last ends
            groups[next(name for name, lo, hi in IDLE_BUCKETS if lo <= idle < hi)].append(r)
        ended[r.session] = r.start + r.stall + r.prefill + r.decode
    base = sum(r.recompute_s for r in records) or 1.0
    out = {}
    for name, group in groups.items():
        tokens = max(1, sum(r.history_tokens for r in group))
        out[name] = dict(turns=len(group), reuse=sum(r.reused_tokens for r in group if r.tier in HITS) / tokens,
                         dram_reuse=sum(_dram_tokens(r) for r in group) / tokens,
                         gpu_saved=sum(r.recompute_s - r.stall - r.prefill - r.decode for r in group) / base)
    return out


def _dram_tokens(r: TurnRecord) -> int:
    if r.dram_tokens is not None:
        return r.dram_tokens
    return r.reused_tokens if r.tier in ("dram", "partial") else 0


def summarize(result: ReplayResult, cost: CostModel) -> dict:
    """What a replay measured. Headline figures are token-weighted: ``reuse`` = history tokens whose
    KV was loaded / history tokens of every turn that has one (``dram_reuse``, ``disk_reuse``: by the
    tier that held them when the job started: what a partial prefetch's job reads on from disk is disk
    reuse), and ``gpu_saved`` = the share of the GPU time of prefilling every prompt
    whole that the store saved. Beside them, turn-weighted rates over the turns with a history: a
    turn is a hit only if it reused at least one token, counted on the tier that served it (a
    partial prefetch's prefix counts as DRAM)
    (``recomputed_rate``: stored but prefilled again; ``overflow_rate``: no history fits the context).
    TTFT, throughput, GPU time and cost follow."""
    recs = result.records
    later = [r for r in recs if r.tier != "first"]
    rate = (lambda tier: sum(r.tier == tier for r in later) / len(later)) if later else (lambda tier: 0.0)
    history = sum(r.history_tokens for r in later)
    reused = sum(r.reused_tokens for r in later if r.tier in HITS)
    dram = sum(_dram_tokens(r) for r in later)
    ttft = [r.ttft for r in recs]
    waits = [r.start - r.arrival for r in recs]
    busy = sum(r.stall + r.prefill + r.decode for r in recs)
    recompute = sum(r.recompute_s for r in recs)
    span = max(r.start + r.stall + r.prefill + r.decode for r in recs) - min(r.arrival for r in recs)
    gpu_seconds = busy * cost.hw.gpus
    usd = cost.dollars(gpu_seconds, result.dram_bytes, result.disk_bytes, span)
    by_length = {}
    for name, lo, hi in HISTORY_BUCKETS:
        group = [r for r in later if lo <= r.history_tokens < hi]
        tokens = sum(r.history_tokens for r in group)
        by_length[name] = dict(turns=len(group), dram_hit_rate=sum(r.tier in ("dram", "partial") for r in group)
                               / max(1, len(group)),
                               dram_reuse=sum(_dram_tokens(r) for r in group) / max(1, tokens))
    return dict(
        policy=result.policy, turns=len(recs), turns_with_history=len(later), by_history_length=by_length,
        by_idle_time=by_idle_time(recs),
        history_tokens=history, reused_tokens=sum(r.reused_tokens for r in later),
        reuse=reused / max(1, history),
        dram_reuse=dram / max(1, history), disk_reuse=(reused - dram) / max(1, history),
        partial_hit_rate=rate("partial"),
        gpu_saved=(recompute - busy) / recompute if recompute else 0.0,
        gpu_saved_hours=(recompute - busy) * cost.hw.gpus / 3600,
        hit_rate=rate("dram") + rate("partial") + rate("disk"), dram_hit_rate=rate("dram") + rate("partial"),
        disk_hit_rate=rate("disk"),
        miss_rate=rate("miss"), recomputed_rate=rate("recomputed"), overflow_rate=rate("overflow"),
        ttft_mean_s=sum(ttft) / len(ttft), ttft_p50_s=percentile(ttft, 50), ttft_p99_s=percentile(ttft, 99),
        queue_wait_mean_s=sum(waits) / len(waits), queue_wait_p99_s=percentile(waits, 99),
        prefill_tokens=sum(r.prefill_tokens for r in recs), prompt_tokens=sum(r.prompt_tokens for r in recs),
        prefill_throughput_tok_s=sum(r.prompt_tokens for r in recs) / max(1e-12, sum(r.ttft for r in recs)),
        gpu_hours=gpu_seconds / 3600, makespan_s=span, cost_usd=usd, cost_usd_per_1k_turns=usd / len(recs) * 1000,
        **{f"store_{k}": v for k, v in result.counters.items()},
    )


COLUMNS = (("policy", "policy", "{:<12}"), ("reuse", "reuse", "{:>6.1%}"), ("dram", "dram_reuse", "{:>6.1%}"),
           ("GPU saved", "gpu_saved", "{:>9.1%}"), ("turn hit", "hit_rate", "{:>8.1%}"),
           ("dram", "dram_hit_rate", "{:>6.1%}"), ("disk", "disk_hit_rate", "{:>6.1%}"),
           ("ttft mean", "ttft_mean_s", "{:>9.3f}"),
           ("p50", "ttft_p50_s", "{:>7.3f}"), ("p99", "ttft_p99_s", "{:>7.3f}"),
           ("prefill tok/s", "prefill_throughput_tok_s", "{:>13,.0f}"), ("GPU h", "gpu_hours", "{:>7.2f}"),
           ("$ / 1k turns", "cost_usd_per_1k_turns", "{:>12.3f}"))


def table(rows: Sequence[dict]) -> str:
    """Fixed-width summary: token-weighted reuse (all tiers, DRAM), GPU time saved against prefilling
    every prompt, turn-weighted hit rates per tier, TTFT in seconds, throughput, GPU hours, cost."""
    widths = [len(fmt.format(rows[0][key])) if rows else len(head) for head, key, fmt in COLUMNS]
    lines = ["  ".join(h.rjust(w) if i else h.ljust(w) for i, ((h, _, _), w) in enumerate(zip(COLUMNS, widths)))]
    for row in rows:
        lines.append("  ".join(fmt.format(row[key]) for _, key, fmt in COLUMNS))
    return "\n".join(lines)


SIMULATED = "simulated (cost model); host CPU runs the simulator"


def environment(device: str = SIMULATED) -> dict:
    from cattn.apps.results import provenance
    return dict(python=sys.version.split()[0], **provenance(), platform=platform.platform(),
                machine=platform.machine(), device=device)


def real_device(device: str) -> str:
    """What a real replay ran on: the model on ``device``, the simulator beside it on the host."""
    return f"{device} (real replay: the model through ChatSession and TieredStore); {SIMULATED}"


def write_json(path: str | Path, payload: dict) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    config = payload.get("config", {})
    device = real_device(config["device"]) if config.get("mode") == "real" else SIMULATED
    path.write_text(json.dumps(dict(environment=environment(device), **payload), indent=1) + "\n")
    return path


def plot_hit_rate_vs_dram(sweep: Sequence[dict], path: str | Path) -> Path:
    """Two panels (store hit rate, DRAM hit rate) against DRAM size, one line per policy."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharex=True)
    for policy in dict.fromkeys(r["policy"] for r in sweep):
        pts = sorted((r["dram_gb"], r["hit_rate"], r["dram_hit_rate"]) for r in sweep if r["policy"] == policy)
        for ax, col in zip(axes, (1, 2)):
            ax.plot([p[0] for p in pts], [100 * p[col] for p in pts], marker="o", label=policy)
    for ax, title in zip(axes, ("hit rate, DRAM + disk (%)", "hit rate in DRAM (%)")):
        ax.set_xscale("log", base=2)
        ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda x, _: f"{x:g}"))
        fixed_disk = len({r["disk_gb"] for r in sweep}) == 1
        ax.set_xlabel("DRAM capacity (GB)" + (f", disk {sweep[0]['disk_gb']:g} GB" if fixed_disk
                                              else ", disk scaled with it"))
        ax.set_title(title)
        ax.set_ylim(0, 100)
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


def plot_ttft_cdf(ttfts: dict[str, Sequence[float]], path: str | Path) -> Path:
    """Cumulative distribution of time to first token, one line per policy (log time axis)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for policy, values in ttfts.items():
        s = sorted(max(v, 1e-4) for v in values)
        ax.plot(s, [100 * (i + 1) / len(s) for i in range(len(s))], label=policy)
    ax.set_xscale("log")
    ax.set_xlabel("time to first token (s), queueing excluded")
    ax.set_ylabel("turns (%)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)
