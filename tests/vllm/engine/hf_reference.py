"""cattn's own truncation on the same model, for comparing with a shifted load in vLLM: the HF model
patched by `cattn.hf.apply_cattn` (keys cached before RoPE), its `PagedCache` truncated."""
from __future__ import annotations

import torch


def patched_model(model_dir: str):
    """The HF model of ``model_dir`` in float32, patched by `cattn.hf.apply_cattn` with pages of one token
    (so that `PagedCache.truncate` drops exactly the tokens asked)."""
    from transformers import AutoModelForCausalLM

    from cattn.hf import apply_cattn

    return apply_cattn(AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval(), page_size=1)


def truncated_logprobs(model, original: list[int], at: int, by: int, prompt: list[int],
                       reply: list[int], loaded: int) -> list[float]:
    """Log-probabilities of ``reply`` after ``prompt`` when the prompt's first ``loaded`` tokens come
    from ``original``'s KV with tokens ``[at, at + by)`` dropped (`PagedCache.truncate`) and the rest of
    the prompt is computed; ``model`` from `patched_model`. Float32 throughout."""
    from cattn.hf import CACHE_KWARG, PagedCache

    if original[:at] != prompt[:at] or original[at + by:loaded + by] != prompt[at:loaded]:
        raise ValueError("prompt is not original with [at, at + by) dropped on its first loaded tokens")
    cache = PagedCache(model, max_tokens=loaded + by + len(prompt) + len(reply))
    with torch.no_grad():
        model(torch.tensor([original[:loaded + by]]), **{CACHE_KWARG: cache})
        if cache.truncate(by, keep_first=at) != by:
            raise RuntimeError("the cache dropped another number of tokens")
        rest = torch.tensor([prompt[loaded:] + reply[:-1]])
        logits = model(rest, **{CACHE_KWARG: cache}).logits[0, -len(reply):].float()
    logp = torch.log_softmax(logits, dim=-1)
    return logp[torch.arange(len(reply)), torch.tensor(reply)].tolist()
