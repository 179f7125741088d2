"""Multi-turn chats through vLLM with and without cattn's KV connector (vLLM's prefix caching on in
both): time to first token and prefilled tokens per turn; a table, and JSON in the results folder.

    python -m bench.vllm_multiturn                 # on the embedded SmolLM2; CPU or GPU, unchanged
    python -m bench.vllm_multiturn --model DIR --conversations 8 --turns 6 --kv-cache-mib 256
    python -m bench.vllm_multiturn --server        # concurrent chats against `vllm serve`

Conversations take turns round-robin, one request at a time, so between two turns of one
conversation the others fill vLLM's KV cache (``--kv-cache-mib``, small on purpose) and evict its
prefix cache: the case cattn's hierarchy is for. Each engine runs in a process of its own. With
``--server``, the conversations run at once against vLLM's OpenAI server (one turn of every
conversation at a time, streamed; `bench/vllm_server_chats.py`), TTFT median and p90 per turn.
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
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

QUESTIONS = ["Tell me about the city of {}.", "What is the best season to visit {}?",
             "Which museums in {} are worth a day?", "How do I get around {} without a car?",
             "What food should I try in {}?", "Where can I stay in {} on a budget?",
             "What day trips start from {}?", "Summarise our conversation about {}."]
CITIES = ["Lisbon", "Vienna", "Kyoto", "Montreal", "Cape Town", "Hanoi", "Oslo", "Lima"]


def run_child(args) -> None:
    """One engine: every conversation's turns, round-robin; writes the per-request rows as JSON."""
    from cattn.vllm import CattnVllmConfig
    from cattn.vllm.chat import EngineSpec, build_llm
    from vllm import SamplingParams

    connector = None
    if args.child == "cattn":
        connector = CattnVllmConfig(dram_bytes=args.dram_mib << 20, disk_dir=args.store_dir)
    llm = build_llm(EngineSpec(model=args.model, connector=connector, prefix_caching=True,
                               max_model_len=args.max_model_len, kv_cache_bytes=args.kv_cache_mib << 20,
                               dtype=args.dtype))
    params = SamplingParams(temperature=0.0, max_tokens=args.max_tokens)
    llm.chat([{"role": "user", "content": "Hello"}], params, use_tqdm=False)   # warm-up, not measured
    convs = [[] for _ in range(args.conversations)]
    rows = []
    for turn in range(args.turns):
        for c, messages in enumerate(convs):
            messages.append({"role": "user", "content": QUESTIONS[turn % len(QUESTIONS)].format(CITIES[c % len(CITIES)])})
            t0 = time.perf_counter()
            out = llm.chat(messages, params, use_tqdm=False)[0]
            wall = time.perf_counter() - t0
            m = out.metrics
            ttft = getattr(m, "first_token_latency", 0.0) if m is not None else 0.0
            messages.append({"role": "assistant", "content": out.outputs[0].text})
            report = (out.kv_transfer_params or {}).get("cattn") or {}
            rows.append(dict(conversation=c, turn=turn + 1, prompt_tokens=len(out.prompt_token_ids),
                             cached_tokens=out.num_cached_tokens or 0,
                             prefilled_tokens=len(out.prompt_token_ids) - (out.num_cached_tokens or 0),
                             loaded_by_cattn=report.get("loaded_tokens", 0),
                             ttft_s=ttft if ttft and ttft > 0 else None, request_s=wall))
    Path(args.child_out).write_text(json.dumps({"rows": rows}))


def summarise(rows: list[dict], turns: int) -> list[dict]:
    out = []
    for turn in range(1, turns + 1):
        sel = [r for r in rows if r["turn"] == turn]
        ttfts = [r["ttft_s"] for r in sel if r["ttft_s"] is not None]
        out.append(dict(turn=turn, prompt=sum(r["prompt_tokens"] for r in sel) / len(sel),
                        prefilled=sum(r["prefilled_tokens"] for r in sel) / len(sel),
                        loaded=sum(r["loaded_by_cattn"] for r in sel) / len(sel),
                        ttft=sum(ttfts) / len(ttfts) if ttfts else None,
                        request=sum(r["request_s"] for r in sel) / len(sel)))
    return out


def public_args(args) -> dict:
    return {k: v for k, v in vars(args).items() if not k.startswith("child") and k != "store_dir"}


def git_commit() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True,
                              cwd=Path(__file__).parent).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", help="a model directory (default: the embedded SmolLM2, converted once)")
    p.add_argument("--conversations", type=int, default=6)
    p.add_argument("--turns", type=int, default=4)
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--max-model-len", type=int, default=512)
    p.add_argument("--kv-cache-mib", type=int, default=24, help="vLLM's KV cache (small: its prefix cache evicts)")
    p.add_argument("--dram-mib", type=int, default=256, help="cattn's DRAM tier")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--server", action="store_true", help="concurrent chats against vllm serve (float32)")
    p.add_argument("--system-repeats", type=int, default=3, help="--server: the system prompt's length, in repeats")
    p.add_argument("--out", help="JSON path (default: vllm_multiturn_<device>.json in the results folder)")
    p.add_argument("--child", choices=["vllm", "cattn"], help=argparse.SUPPRESS)
    p.add_argument("--child-out", help=argparse.SUPPRESS)
    p.add_argument("--store-dir", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        return run_child(args)
    for name in ("conversations", "turns", "max_tokens", "kv_cache_mib", "dram_mib", "system_repeats"):
        if getattr(args, name) <= 0:
            raise ValueError(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")

    import torch

    import cattn
    from bench.common import format_table, write_json
    from cattn.vllm.model_dir import export_embedded_model

    model = args.model or str(export_embedded_model())
    if args.server:
        from bench.vllm_server_chats import COLUMNS, server_benchmark

        table, results = server_benchmark(args, model, QUESTIONS, CITIES)
        print(format_table(table, COLUMNS))
        print(f"({args.conversations} conversations at once; vLLM's prefix caching on in both)")
        device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
        name = f"vllm_serve_{'gpu' if torch.cuda.is_available() else 'cpu'}.json"
        path = write_json(name, dict(benchmark="vllm_multiturn --server", device=device, cattn_version=cattn.__version__,
                                     commit=git_commit(), args=public_args(args), per_turn=table, runs=results),
                          Path(args.out) if args.out else None)
        print(f"wrote {path}")
        return
    results = {}
    with tempfile.TemporaryDirectory(prefix="cattn-vllm-bench-") as tmp:
        for mode in ("vllm", "cattn"):
            child_out = Path(tmp) / f"{mode}.json"
            cmd = [sys.executable, "-m", "bench.vllm_multiturn", "--child", mode, "--child-out", str(child_out),
                   "--store-dir", str(Path(tmp) / "store"), "--model", model]
            for name in ("conversations", "turns", "max_tokens", "max_model_len", "kv_cache_mib", "dram_mib",
                         "dtype"):
                cmd += [f"--{name.replace('_', '-')}", str(getattr(args, name))]
            print(f"running vLLM {'with' if mode == 'cattn' else 'without'} cattn's connector ...", flush=True)
            subprocess.run(cmd, check=True, cwd=Path(__file__).resolve().parents[1],
                           env=dict(os.environ, TOKENIZERS_PARALLELISM="false"))
            results[mode] = json.loads(child_out.read_text())
    table = []
    for a, b in zip(summarise(results["vllm"]["rows"], args.turns), summarise(results["cattn"]["rows"], args.turns)):
        table.append(dict(turn=a["turn"], prompt=a["prompt"], prefilled_vllm=a["prefilled"],
                          prefilled_cattn=b["prefilled"], loaded=b["loaded"], ttft_vllm=a["ttft"],
                          ttft_cattn=b["ttft"]))
    print(format_table(table, [("turn", "turn", "d"), ("prompt", "prompt tokens", ".0f"),
                               ("prefilled_vllm", "prefilled vLLM", ".1f"), ("prefilled_cattn", "prefilled +cattn", ".1f"),
                               ("loaded", "loaded by cattn", ".1f"), ("ttft_vllm", "TTFT vLLM (s)", ".3f"),
                               ("ttft_cattn", "TTFT +cattn (s)", ".3f")]))
    print("(means over conversations; vLLM's prefix caching on in both)")
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    name = f"vllm_multiturn_{'gpu' if torch.cuda.is_available() else 'cpu'}.json"
    path = write_json(name, dict(benchmark="vllm_multiturn", device=device, cattn_version=cattn.__version__,
                                 commit=git_commit(), omp_num_threads=os.environ.get("OMP_NUM_THREADS"),
                                 args=public_args(args), per_turn=table, runs=results), Path(args.out) if args.out else None)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
