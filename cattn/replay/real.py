"""Real replay: ShareGPT conversations through `ChatSession` and the tiered store, on the embedded
model (SmolLM2-135M-Instruct, CPU) or a local HF model; then the simulator on the same trace.

Each turn sends the conversation so far with the dataset's own assistant answers and the
next user message, and generates one token: time to first token and the store's work are
what is measured, and the history is exactly ShareGPT's (messages are clipped to
``--max-user-tokens`` / ``--max-answer-tokens`` so that 50 conversations fit in minutes on a
CPU). The queue is backlogged: every turn is queued from the start, in the order the
arrival process gives, and the store sees the whole queue as its look-ahead. Where each
turn found its history (DRAM, disk, nowhere) comes from the store's counters. With
``--partial-prefetch`` the store runs with ``partial_prefetch=True`` and the simulator with
`TierModel.partial_prefetch`; with ``--kv-format int8`` the store keeps its host tiers in 8 bits and the
simulator's bytes per token are that format's. The replay waits for the prefetches before each turn and gives
no expected starts, so in the store no read is cut short or reordered by it: only the
simulator's turns can use a part of a read.
"""
from __future__ import annotations

import argparse
import tempfile
import time
from dataclasses import asdict, dataclass, replace

from cattn.replay.costmodel import CostModel, Hardware, ModelShape
from cattn.replay.queue import Job, JobQueue
from cattn.replay.report import percentile, summarize, write_json
from cattn.replay.sim import RECOMPUTE, TIERED_STORE, simulate
from cattn.replay.records import number_turns
from cattn.replay.workload import ArrivalConfig, schedule
from cattn.store.policy import make_policy


# small tiers for a small model: a few SmolLM2 sessions (46 KB of fp32 KV per token) in DRAM
REAL_DRAM, REAL_DISK = 128 * 2**20, 512 * 2**20


@dataclass
class RealTurn:
    session: str
    tier: str           # "first", "dram", "disk" or "miss"
    prompt_tokens: int
    reused_tokens: int
    kv_tokens: int      # tokens the store holds for the session after the turn
    ttft_s: float


def _clip(tok, text: str, n: int) -> str:
    ids = tok(text, add_special_tokens=False)["input_ids"]
    return text if len(ids) <= n else tok.decode(ids[:n])


def shape_of(model) -> ModelShape:
    """The cost model's view of a loaded HF model (KV bytes per token from its config and dtype)."""
    c = model.config.get_text_config()
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    return ModelShape(c.model_type, c.num_hidden_layers, c.num_attention_heads,
                      getattr(c, "num_key_value_heads", None) or c.num_attention_heads, head_dim,
                      float(sum(p.numel() for p in model.parameters())), c.max_position_embeddings,
                      dtype_bytes=next(model.parameters()).element_size())


def replay_real(model, tok, conversations, order: list[str], policy: str, dram_bytes: int, disk_bytes: int,
                *, progress: bool = True, store_config=None, partial_prefetch: bool = False,
                kv_format: str = "lossless") -> tuple[list[RealTurn], dict]:
    """Run the turns in ``order`` (session ids; each occurrence is that session's next turn) through
    `ChatSession`s sharing one `TieredStore` (with ``partial_prefetch``: `TieredStore`'s option on; with an
    8-bit ``kv_format``, the store's host tiers in it); returns what each turn did and the store's counters."""
    from cattn.hf import fingerprint
    from cattn.chat.session import ChatSession
    from cattn.store.config import build_store
    from cattn.store.contract import EntryKey
    from cattn.store.lower.disk import DiskTier
    from cattn.store.tiered.store import TieredStore

    fp = fingerprint(model)
    keys = {s: EntryKey("default", fp, s) for s in conversations}
    pol = make_policy(policy, accesses=[keys[s] for s in order])
    queue = JobQueue(dram_bytes, disk_bytes)
    for s in order:
        queue.push(Job(s, 0.0, 1, 0))
    kv_per_token = shape_of(model).kv_bytes_per_token
    with tempfile.TemporaryDirectory(prefix="cattn-replay-") as root:
        # the run's policy, the file's tiers; the option only when asked, so that a file's setting holds
        options = {"policy": pol} | ({"partial_prefetch": True} if partial_prefetch else {}) \
            | ({"kv_format": kv_format} if kv_format != "lossless" else {})
        store = (TieredStore(dram_bytes, DiskTier(root, disk_bytes), **options) if store_config is None
                 else build_store(store_config, **options))
        sessions, sent, turns, kv_tokens = {}, {s: 0 for s in conversations}, [], {}
        bar = None
        if progress:
            from tqdm import tqdm
            bar = tqdm(total=len(order), desc=f"real {policy}", unit="turn", leave=False)
        try:
            for _ in range(len(order)):
                job = queue.pop()
                s = job.session
                if kv_tokens:
                    queue.mean_session_bytes = kv_per_token * sum(kv_tokens.values()) / len(kv_tokens)
                prefetch_window, eviction_window = queue.windows()
                store.sync()  # the prefetches of the last queue are done (or could not be)
                store.job_started(keys[s])
                store.update_queue([keys[queue[i]] for i in range(len(queue))], prefetch_window=prefetch_window,
                                   eviction_window=eviction_window)
                if s not in sessions:
                    sessions[s] = ChatSession(model, tok, session_id=s, store=store)
                k = sent[s]
                messages = [m for u, a in conversations[s][:k] for m in ({"role": "user", "content": u},
                                                                           {"role": "assistant", "content": a})]
                messages.append({"role": "user", "content": conversations[s][k][0]})
                before = store.stats()
                sessions[s].send(messages, max_new_tokens=1, do_sample=False)
                after = store.stats()
                stats = sessions[s].turns[-1]
                if k == 0:
                    tier = "first"
                elif after["dram"]["hits"] > before["dram"]["hits"]:
                    tier = "dram"
                elif after.get("disk", {}).get("hits", 0) > before.get("disk", {}).get("hits", 0):  # DRAM-only config
                    tier = "disk"
                else:
                    tier = "miss"
                kv_tokens[s] = stats.kv_bytes // kv_per_token
                turns.append(RealTurn(s, tier, stats.prompt_tokens, stats.reused_tokens, kv_tokens[s], stats.ttft_s))
                sent[s] = k + 1
                if bar is not None:
                    bar.update()
        finally:
            if bar is not None:
                bar.close()
        counters = store.stats()
        counters["kv_format"] = store.kv_format   # the simulator's bytes per token follow the store's format
        for session in sessions.values():
            session.close()
        store.close(persist=False)
    return turns, counters


def same_trace_for_the_simulator(turns: list[RealTurn]) -> list[Job]:
    """The real run's turns as a trace: same order, same token counts (what each turn added to the
    session's stored history), all queued from the start."""
    jobs, stored = [], {}
    for i, t in enumerate(turns):
        new = max(0, t.prompt_tokens - stored.get(t.session, 0))
        out = max(0, t.kv_tokens - t.prompt_tokens)
        jobs.append(Job(t.session, i * 1e-9, new, out))
        stored[t.session] = t.kv_tokens
    return number_turns(jobs)


def this_machine(shape: ModelShape, turns: list[RealTurn], disk_bytes_per_s: float = 1e9) -> Hardware:
    """The cost model of the machine that ran the real replay: one device whose FLOP rate is what
    the turns' prefills achieved (matmul FLOPs over the measured times to first token), host memory
    as its own memory (no copy link to speak of), and a disk of ``disk_bytes_per_s``."""
    flops = sum(2 * shape.params * (t.prompt_tokens - t.reused_tokens) for t in turns)
    seconds = sum(t.ttft_s for t in turns)
    return Hardware(gpus=1, peak_flops=max(flops, 1.0) / max(seconds, 1e-9), mfu=1.0, pcie_bytes_per_s=1e12,
                    hbm_bytes_per_s=1e11, disk_read_bytes_per_s=disk_bytes_per_s, decode_batch=1)


def rates(tiers: list[str]) -> dict:
    later = [t for t in tiers if t != "first"]
    n = max(1, len(later))
    return {f"{k}_hit_rate": sum(t == k for t in later) / n for k in ("dram", "disk")} | {
        "hit_rate": sum(t in ("dram", "disk") for t in later) / n}


def run_real(args: argparse.Namespace) -> int:
    from cattn.hf import apply_cattn, load_model
    from cattn.replay.sharegpt import load_conversations

    policies = [p for p in args.policies if p != RECOMPUTE]
    if not policies:
        raise ValueError("--mode real replays store policies: give at least one besides 'recompute'")

    model, tok = load_model(args.model_path, device=args.device)
    apply_cattn(model)
    convs = {}
    for _, pairs in load_conversations():
        if len(pairs) >= 2:
            convs[f"c{len(convs)}"] = [(_clip(tok, u, args.max_user_tokens), _clip(tok, a, args.max_answer_tokens))
                                       for u, a in pairs[:args.max_turns]]
        if len(convs) == args.conversations:
            break
    names = list(convs)
    counts = [[(len(tok(u)["input_ids"]), len(tok(a)["input_ids"])) for u, a in convs[s]] for s in names]
    order = [j.session for j in schedule(counts, ArrivalConfig(rate=args.rate, think_mean=args.think, seed=args.seed),
                                         names=names)]
    shape = shape_of(model)
    dram, disk = args.dram or REAL_DRAM, args.disk or REAL_DISK
    partial = args.partial_prefetch
    tiers = replace(TIERED_STORE, partial_prefetch=True) if partial else TIERED_STORE
    rows, started = [], time.perf_counter()
    for policy in policies:
        t0 = time.perf_counter()
        turns, counters = replay_real(model, tok, convs, order, policy, dram, disk, progress=not args.no_progress,
                                      store_config=args.store_config, partial_prefetch=partial,
                                      kv_format=args.kv_format)
        wall = time.perf_counter() - t0
        # the simulator's tiers behave as the store's: inclusive disk, watermarks, its prefetch lane
        cost = CostModel(shape, this_machine(shape, turns), kv_format=counters["kv_format"])
        simulated = summarize(simulate(same_trace_for_the_simulator(turns), policy,
                                       counters["dram"]["capacity_bytes"], disk, cost, tiers=tiers), cost)
        measured = rates([t.tier for t in turns])
        ttft = [t.ttft_s for t in turns]
        rows.append(dict(policy=policy, turns=len(turns), wall_s=wall, measured=measured,
                         simulated={k: simulated[k] for k in measured},
                         difference_points={k: 100 * (measured[k] - simulated[k]) for k in measured},
                         ttft_mean_s=sum(ttft) / len(ttft), ttft_p50_s=percentile(ttft, 50),
                         ttft_p99_s=percentile(ttft, 99),
                         reused_tokens=sum(t.reused_tokens for t in turns),
                         prompt_tokens=sum(t.prompt_tokens for t in turns), store=counters,
                         per_turn=[asdict(t) for t in turns]))
        print(f"{policy}: {len(turns)} turns in {wall:.0f} s; hit rate measured {measured['hit_rate']:.1%} "
              f"(DRAM {measured['dram_hit_rate']:.1%}), simulated {simulated['hit_rate']:.1%} "
              f"(DRAM {simulated['dram_hit_rate']:.1%}); TTFT mean {rows[-1]['ttft_mean_s']:.3f} s", flush=True)
        # written after every policy: a long run keeps what it measured
        path = write_json(args.out / f"replay_{args.name}_real.json",
                          dict(config={k: str(v) for k, v in vars(args).items() if not k.startswith("_")},
                               model=shape.__dict__, conversations=len(convs), dram_bytes=dram, disk_bytes=disk,
                               total_wall_s=time.perf_counter() - started, results=rows))
    print(f"wrote {path}")
    return 0

