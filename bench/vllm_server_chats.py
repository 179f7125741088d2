"""`bench/vllm_multiturn.py --server`: concurrent conversations against vLLM's OpenAI server, with and
without cattn's connector (prefix caching on in both, vLLM's defaults otherwise), streamed so that
each turn's time to first token is the client's own: per turn, the median and 90th percentile TTFT
and the mean prefilled tokens (prompt minus what vLLM's cache and cattn supplied)."""
from __future__ import annotations

import statistics
import tempfile
from pathlib import Path

SYSTEM = ("You are a travel assistant for {city}. Answer briefly and concretely. Keep in mind the "
          "traveller's budget, the season, the local transport, opening hours of museums and sights, "
          "and the neighbourhoods that suit families, students and older travellers. ")


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    values = sorted(values)
    return values[min(len(values) - 1, round(q * (len(values) - 1)))]


def run_server(mode: str, args, model: str, store_dir: str, questions: list[str], cities: list[str], log: Path) -> list[dict]:
    """Every conversation's turns on one server (``mode`` "vllm" or "cattn"), all conversations at once."""
    from cattn.vllm import CattnVllmConfig
    from cattn.vllm.server import ServedChat, VllmServer, chat_concurrently

    connector = CattnVllmConfig(dram_bytes=args.dram_mib << 20, disk_dir=store_dir) if mode == "cattn" else None
    server_args = ["--max-model-len", str(args.max_model_len), "--kv-cache-memory-bytes", str(args.kv_cache_mib << 20)]
    chats = [ServedChat(SYSTEM.format(city=cities[c % len(cities)]) * args.system_repeats, max_tokens=args.max_tokens)
             for c in range(args.conversations)]
    with VllmServer(model, log, *server_args, connector=connector) as server:
        warm = ServedChat("Warm-up.", max_tokens=4)
        chat_concurrently(server, [(warm, ["Hello"])], stream=True)   # not measured
        for turn in range(args.turns):
            # one turn of every conversation at once, so turns of one conversation are apart in time
            question = questions[turn % len(questions)]
            chat_concurrently(server, [(chat, [question.format(cities[c % len(cities)])]) for c, chat in enumerate(chats)],
                              stream=True)
    rows = []
    for c, chat in enumerate(chats):
        for t, turn in enumerate(chat.turns):
            rows.append(dict(conversation=c, turn=t + 1, prompt_tokens=turn["prompt_tokens"],
                             cached_tokens=turn["cached_tokens"],
                             prefilled_tokens=turn["prompt_tokens"] - turn["cached_tokens"],
                             ttft_s=turn["ttft_s"], request_s=turn["request_s"]))
    return rows


def summarise(rows: list[dict], turns: int) -> list[dict]:
    out = []
    for turn in range(1, turns + 1):
        sel = [r for r in rows if r["turn"] == turn]
        ttfts = [r["ttft_s"] for r in sel if r["ttft_s"] is not None]
        out.append(dict(turn=turn, prompt=statistics.mean(r["prompt_tokens"] for r in sel),
                        prefilled=statistics.mean(r["prefilled_tokens"] for r in sel),
                        ttft_median=statistics.median(ttfts) if ttfts else None, ttft_p90=percentile(ttfts, 0.9)))
    return out


def server_benchmark(args, model: str, questions: list[str], cities: list[str]) -> tuple[list[dict], dict]:
    """Both servers, one after the other: the per-turn table and the raw rows."""
    results = {}
    with tempfile.TemporaryDirectory(prefix="cattn-vllm-serve-") as tmp:
        for mode in ("vllm", "cattn"):
            print(f"serving {args.conversations} concurrent conversations {'with' if mode == 'cattn' else 'without'} "
                  "cattn's connector ...", flush=True)
            results[mode] = run_server(mode, args, model, str(Path(tmp) / "store"), questions, cities,
                                       Path(tmp) / f"{mode}.log")
    table = []
    for a, b in zip(summarise(results["vllm"], args.turns), summarise(results["cattn"], args.turns)):
        table.append(dict(turn=a["turn"], prompt=a["prompt"], prefilled_vllm=a["prefilled"],
                          prefilled_cattn=b["prefilled"], ttft_vllm=a["ttft_median"], ttft_cattn=b["ttft_median"],
                          ttft_p90_vllm=a["ttft_p90"], ttft_p90_cattn=b["ttft_p90"]))
    return table, results


COLUMNS = [("turn", "turn", "d"), ("prompt", "prompt tokens", ".0f"), ("prefilled_vllm", "prefilled vLLM", ".1f"),
           ("prefilled_cattn", "prefilled +cattn", ".1f"), ("ttft_vllm", "TTFT p50 vLLM (s)", ".3f"),
           ("ttft_cattn", "TTFT p50 +cattn (s)", ".3f"), ("ttft_p90_vllm", "TTFT p90 vLLM (s)", ".3f"),
           ("ttft_p90_cattn", "TTFT p90 +cattn (s)", ".3f")]
