"""bench/hf_cpu.py's multi-turn part: time to first token of a `ChatSession`'s second turn, its history
already in the store, against the stock model generating over the whole conversation again."""
from __future__ import annotations

import random
import statistics

from bench.hf_cpu_models import set_variant, timed_generate

WORDS = ("river stone lamp orchard violet copper signal harbor meadow ladder canvas thunder pencil garden "
         "window marble falcon silver engine basket lantern cedar frost ribbon anchor").split()
REPLY_TOKENS = 4          # tokens of each reply (turn 1's and each measured turn 2's)


def filler(tokenizer, tokens: int, seed: int) -> str:
    """Text of about ``tokens`` tokens: random words, cut to the count through the tokenizer."""
    rng = random.Random(seed)
    text = " ".join(rng.choice(WORDS) for _ in range(tokens + 16))
    ids = tokenizer(text, add_special_tokens=False)["input_ids"][:tokens]
    return tokenizer.decode(ids)


def fits(model, history: int) -> bool:
    """Whether a history of ``history`` tokens, a question and two replies fit the model's positions."""
    return history + 64 + 2 * REPLY_TOKENS <= model.config.get_text_config().max_position_embeddings


def one_history(model, tokenizer, history: int, repeats: int, seed: int) -> dict:
    """Turn 1 sends about ``history`` tokens to a fresh session (default in-process store); then per repeat
    a new question after that history: turn 2 through the session (history reused from the store) and the
    stock model over the same rendered prompt, interleaved (the order alternates). ``model`` leaves stock."""
    import torch

    from cattn.chat.session import ChatSession
    from cattn.chat.turns import render

    greedy = dict(max_new_tokens=REPLY_TOKENS, min_new_tokens=REPLY_TOKENS, do_sample=False)
    set_variant(model, "cattn")
    session = ChatSession(model, tokenizer, session_id=f"hf-cpu-{history}")
    try:
        overhead = len(render(tokenizer, [{"role": "user", "content": ""}], generation_prompt=True))
        session.send(filler(tokenizer, history - overhead - REPLY_TOKENS, seed), **greedy)
        first_turn = session.turns[-1]
        conversation = list(session.messages)
        runs = {"cattn": [], "stock": []}
        tokens, reused, prefilled, mismatches = {}, [], [], []
        for r in range(repeats):
            messages = [*conversation, {"role": "user", "content": f"Question {r}: which word came {r + 3}th?"}]
            prompt = render(tokenizer, messages, generation_prompt=True)
            for variant in ("cattn", "stock") if r % 2 == 0 else ("stock", "cattn"):
                set_variant(model, variant)
                if variant == "cattn":
                    session.send(messages, **greedy)
                    turn = session.turns[-1]
                    ids = session.token_ids.tolist()
                    if ids[:turn.prompt_tokens] != prompt:
                        raise RuntimeError("the session's prompt is not the rendered conversation")
                    runs["cattn"].append(turn.ttft_s)
                    tokens["cattn"] = ids[turn.prompt_tokens:]
                    reused.append(turn.reused_tokens)
                    prefilled.append(turn.prefilled_tokens)
                else:
                    out = timed_generate(model, torch.tensor([prompt]), REPLY_TOKENS)
                    runs["stock"].append(out["prefill_s"])
                    tokens["stock"] = out["tokens"]
            if tokens["cattn"] != tokens["stock"]:
                mismatches.append(dict(repeat=r, cattn=tokens["cattn"], stock=tokens["stock"]))
    finally:
        session.close()
        set_variant(model, "stock")
    cattn_s, stock_s = statistics.median(runs["cattn"]), statistics.median(runs["stock"])
    return dict(history=history, history_tokens=first_turn.prompt_tokens + first_turn.generated_tokens,
                prompt_tokens=len(prompt), reused_tokens=min(reused), prefilled_tokens=max(prefilled),
                turn1_ttft_s=first_turn.ttft_s, cattn_ttft_s=cattn_s, stock_ttft_s=stock_s,
                speedup=stock_s / cattn_s, greedy_match=not mismatches, mismatches=mismatches,
                runs_s=runs, store="MemoryStore (ChatSession's default)")
