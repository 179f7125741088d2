"""Multi-turn chats through a vLLM `LLM`, turn by turn, with what each turn cost; shared by the
connector's tests and `bench/vllm_multiturn.py`. Imports vLLM when called."""
from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass, field
from typing import Any

from cattn.vllm import CattnVllmConfig, kv_transfer_config


@dataclass
class EngineSpec:
    """A vLLM engine on the embedded model (or ``model``), small enough for a shared CPU.

    Attributes:
        connector: cattn's store behind the connector, or None for plain vLLM.
        prefix_caching: vLLM's own prefix cache.
        kv_cache_gib: vLLM's KV cache on CPU (``VLLM_CPU_KVCACHE_SPACE``) when ``kv_cache_bytes`` is None.
        kv_cache_bytes: vLLM's KV cache in bytes, on CPU or GPU (``kv_cache_memory_bytes``).
    """

    model: str
    connector: CattnVllmConfig | None = None
    prefix_caching: bool = False
    max_model_len: int = 2048
    block_size: int = 32     # the CPU backend takes multiples of 32
    kv_cache_gib: int = 1
    kv_cache_bytes: int | None = None
    dtype: str = "float32"   # bf16 prefill of a suffix vs the whole prompt may round apart
    extra: dict[str, Any] = field(default_factory=dict)


def build_llm(spec: EngineSpec):
    """The `LLM` of ``spec``: eager (no compile warm-up), one process for scheduler and worker (what
    the connector needs; on CPU that takes ``VLLM_ENABLE_V1_MULTIPROCESSING=0``). Call from under an
    ``if __name__ == "__main__":`` guard."""
    if spec.kv_cache_bytes is None:
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(spec.kv_cache_gib))
    else:
        os.environ.pop("VLLM_CPU_KVCACHE_SPACE", None)   # on CPU a set variable overrides the argument
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    from vllm import LLM

    kwargs = dict(model=spec.model, max_model_len=spec.max_model_len, block_size=spec.block_size,
                  enable_prefix_caching=spec.prefix_caching, enforce_eager=True, dtype=spec.dtype, seed=0,
                  distributed_executor_backend="uni", disable_log_stats=False, **spec.extra)
    if spec.kv_cache_bytes is not None:
        kwargs["kv_cache_memory_bytes"] = spec.kv_cache_bytes
    if spec.connector is not None:
        kwargs["kv_transfer_config"] = kv_transfer_config(spec.connector)
    return LLM(**kwargs)


@dataclass
class Turn:
    reply: str
    prompt_tokens: int
    cached_tokens: int        # tokens vLLM did not compute: its prefix cache plus the connector's load
    ttft_s: float
    cattn: dict | None        # the connector's report (kv_transfer_params["cattn"])

    @property
    def prefilled_tokens(self) -> int:
        return self.prompt_tokens - self.cached_tokens


def chat(llm, user_turns: list[str], *, max_tokens: int = 24, cache_salt: str | None = None,
         session: str | None = None, system: str | None = None) -> list[Turn]:
    """Greedy multi-turn chat: each turn renders the whole conversation so far; returns one `Turn` each.

    Without ``cache_salt`` the turns go through `LLM.chat`; with one, through `LLM.generate` on the
    rendered token ids (``LLM.chat`` takes no salt). ``session`` goes to the connector in
    ``kv_transfer_params``.
    """
    from vllm import SamplingParams

    extra = {"kv_transfer_params": {"cattn_session": session}} if session else None
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, extra_args=extra)
    messages = [{"role": "system", "content": system}] if system else []
    tokenizer = llm.get_tokenizer()
    turns = []
    for text in user_turns:
        messages.append({"role": "user", "content": text})
        t0 = time.perf_counter()
        if cache_salt is None:
            out = llm.chat(messages, params, use_tqdm=False)[0]
        else:
            ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
            ids = list(ids["input_ids"] if hasattr(ids, "keys") else ids)   # a BatchEncoding in transformers 5
            out = llm.generate({"prompt_token_ids": ids, "cache_salt": cache_salt}, params, use_tqdm=False)[0]
        wall = time.perf_counter() - t0
        metrics = getattr(out, "metrics", None)
        ttft = getattr(metrics, "first_token_latency", None) or getattr(metrics, "first_token_ts", None)
        reply = out.outputs[0].text
        messages.append({"role": "assistant", "content": reply})
        turns.append(Turn(reply, len(out.prompt_token_ids), out.num_cached_tokens or 0,
                          float(ttft) if isinstance(ttft, float) and ttft < wall else wall,
                          (out.kv_transfer_params or {}).get("cattn")))
    return turns


def store_stats() -> dict | None:
    """The store's `stats()` of the (one) engine with a cattn connector in this process, or None."""
    from cattn.vllm import engine_state

    engines = engine_state.engines()
    return engines[0].store.stats() if engines else None


def turns_json(turns: list[Turn]) -> list[dict]:
    return [dict(asdict(t), prefilled_tokens=t.prefilled_tokens) for t in turns]
