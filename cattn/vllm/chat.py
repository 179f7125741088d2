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
        tensor_parallel: vLLM's tensor parallel size (workers in processes of their own when > 1).
        in_process: scheduler and worker in this process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``,
            executor "uni"); otherwise vLLM's default multi-process engine (and executor "mp" for TP > 1).
        cpu_threads_bind: ``VLLM_CPU_OMP_THREADS_BIND``, e.g. ``"0|1|0"`` to run 3 CPU workers on 2 cores.
        kv_cache_gib: vLLM's KV cache on CPU (``VLLM_CPU_KVCACHE_SPACE``) when ``kv_cache_bytes`` is None.
        kv_cache_bytes: vLLM's KV cache in bytes, on CPU or GPU (``kv_cache_memory_bytes``).
    """

    model: str
    connector: CattnVllmConfig | None = None
    prefix_caching: bool = False
    tensor_parallel: int = 1
    in_process: bool = True
    cpu_threads_bind: str | None = None
    max_model_len: int = 2048
    block_size: int = 32     # the CPU backend takes multiples of 32
    kv_cache_gib: int = 1
    kv_cache_bytes: int | None = None
    dtype: str = "float32"   # bf16 prefill of a suffix vs the whole prompt may round apart
    extra: dict[str, Any] = field(default_factory=dict)


def build_llm(spec: EngineSpec):
    """The `LLM` of ``spec``, eager (no compile warm-up). Call from under an
    ``if __name__ == "__main__":`` guard: vLLM starts processes."""
    if spec.kv_cache_bytes is None:
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(spec.kv_cache_gib))
    else:
        os.environ.pop("VLLM_CPU_KVCACHE_SPACE", None)   # on CPU a set variable overrides the argument
    if spec.in_process:
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    else:
        os.environ.pop("VLLM_ENABLE_V1_MULTIPROCESSING", None)
    if spec.cpu_threads_bind is not None:
        os.environ["VLLM_CPU_OMP_THREADS_BIND"] = spec.cpu_threads_bind
    from vllm import LLM

    executor = "uni" if spec.in_process else ("mp" if spec.tensor_parallel > 1 else None)
    kwargs = dict(model=spec.model, max_model_len=spec.max_model_len, block_size=spec.block_size,
                  enable_prefix_caching=spec.prefix_caching, enforce_eager=True, dtype=spec.dtype, seed=0,
                  tensor_parallel_size=spec.tensor_parallel, distributed_executor_backend=executor,
                  disable_log_stats=False, **spec.extra)
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
    external_tokens: int = 0  # vLLM's own count of tokens from KV transfer (prompt_tokens_by_source)

    @property
    def prefilled_tokens(self) -> int:
        return self.prompt_tokens - self.cached_tokens


@dataclass
class Conversation:
    """A greedy multi-turn chat: each turn renders the whole conversation so far.

    Attributes:
        user_turns: the user's messages, one per turn.
        system: a system prompt, or None.
        cache_salt: the tenant (turns then go through `LLM.generate` on the rendered token ids, since
            ``LLM.chat`` takes no salt), or None.
        session: the client's session id for the connector (``kv_transfer_params``), or None.
    """

    user_turns: list[str]
    system: str | None = None
    cache_salt: str | None = None
    session: str | None = None
    max_tokens: int = 24
    turns: list[Turn] = field(default_factory=list)
    messages: list[dict] = field(default_factory=list)

    def __post_init__(self):
        if self.system and not self.messages:
            self.messages.append({"role": "system", "content": self.system})


def external_tokens(llm) -> int:
    """vLLM's running count of prompt tokens that came from KV transfer (the connector)."""
    return int(sum(getattr(m, "value", 0) for m in llm.get_metrics()
                   if m.name == "vllm:prompt_tokens_by_source" and m.labels.get("source") == "external_kv_transfer"))


def take_turn(llm, conv: Conversation) -> Turn:
    """Send ``conv``'s next user turn; its reply joins the conversation."""
    from vllm import SamplingParams

    extra = {"kv_transfer_params": {"cattn_session": conv.session}} if conv.session else None
    params = SamplingParams(temperature=0.0, max_tokens=conv.max_tokens, extra_args=extra)
    conv.messages.append({"role": "user", "content": conv.user_turns[len(conv.turns)]})
    before = external_tokens(llm)
    t0 = time.perf_counter()
    if conv.cache_salt is None:
        out = llm.chat(conv.messages, params, use_tqdm=False)[0]
    else:
        ids = llm.get_tokenizer().apply_chat_template(conv.messages, add_generation_prompt=True, tokenize=True)
        ids = list(ids["input_ids"] if hasattr(ids, "keys") else ids)   # a BatchEncoding in transformers 5
        out = llm.generate({"prompt_token_ids": ids, "cache_salt": conv.cache_salt}, params, use_tqdm=False)[0]
    wall = time.perf_counter() - t0
    metrics = getattr(out, "metrics", None)
    ttft = getattr(metrics, "first_token_latency", None) or getattr(metrics, "first_token_ts", None)
    reply = out.outputs[0].text
    conv.messages.append({"role": "assistant", "content": reply})
    turn = Turn(reply, len(out.prompt_token_ids), out.num_cached_tokens or 0,
                float(ttft) if isinstance(ttft, float) and ttft < wall else wall,
                (out.kv_transfer_params or {}).get("cattn"), external_tokens(llm) - before)
    conv.turns.append(turn)
    return turn


def chat(llm, user_turns: list[str], *, max_tokens: int = 24, cache_salt: str | None = None,
         session: str | None = None, system: str | None = None) -> list[Turn]:
    """One conversation's turns in order (see `Conversation`); returns one `Turn` each."""
    conv = Conversation(user_turns, system, cache_salt, session, max_tokens)
    for _ in user_turns:
        take_turn(llm, conv)
    return conv.turns


def interleaved(llm, conversations: list[Conversation]) -> list[list[Turn]]:
    """Turn 1 of every conversation, then turn 2 of every one, ...: between two turns of one
    conversation the others fill vLLM's KV cache (and may evict its prefix cache)."""
    for i in range(max(len(c.user_turns) for c in conversations)):
        for conv in conversations:
            if i < len(conv.user_turns):
                take_turn(llm, conv)
    return [c.turns for c in conversations]


def turns_json(turns: list[Turn]) -> list[dict]:
    return [dict(asdict(t), prefilled_tokens=t.prefilled_tokens) for t in turns]


def prompt_length(llm, messages: list[dict]) -> int:
    """Tokens of ``messages`` rendered with the generation prompt, as `take_turn` sends them."""
    ids = llm.get_tokenizer().apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    return len(ids["input_ids"] if hasattr(ids, "keys") else ids)


def send_ids(llm, messages: list[dict], *, session: str | None = None, max_tokens: int = 24,
             cache_salt: str | None = None) -> dict:
    """One greedy request of ``messages`` rendered to token ids, and its record: the `Turn`'s fields
    (`turns_json`) and ``prompt_ids``, ``reply_ids``, ``logprobs`` (each reply token's log-probability)."""
    from vllm import SamplingParams

    extra = {"kv_transfer_params": {"cattn_session": session}} if session else None
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, extra_args=extra, logprobs=1)
    ids = llm.get_tokenizer().apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    ids = list(ids["input_ids"] if hasattr(ids, "keys") else ids)
    prompt = {"prompt_token_ids": ids} if cache_salt is None else {"prompt_token_ids": ids, "cache_salt": cache_salt}
    before = external_tokens(llm)
    t0 = time.perf_counter()
    out = llm.generate(prompt, params, use_tqdm=False)[0]
    wall = time.perf_counter() - t0
    metrics = getattr(out, "metrics", None)
    ttft = getattr(metrics, "first_token_latency", None) or getattr(metrics, "first_token_ts", None)
    gen = out.outputs[0]
    turn = Turn(gen.text, len(ids), out.num_cached_tokens or 0,
                float(ttft) if isinstance(ttft, float) and ttft < wall else wall,
                (out.kv_transfer_params or {}).get("cattn"), external_tokens(llm) - before)
    reply = list(gen.token_ids)
    logprobs = [float(step[t].logprob) for t, step in zip(reply, gen.logprobs or [])]
    return dict(turns_json([turn])[0], prompt_ids=ids, reply_ids=reply, logprobs=logprobs)


def take_turn_ids(llm, conv: Conversation) -> dict:
    """`take_turn` through `send_ids`: the turn joins ``conv`` and its `send_ids` record is returned."""
    conv.messages.append({"role": "user", "content": conv.user_turns[len(conv.turns)]})
    record = send_ids(llm, conv.messages, session=conv.session, max_tokens=conv.max_tokens,
                      cache_salt=conv.cache_salt)
    conv.messages.append({"role": "assistant", "content": record["reply"]})
    conv.turns.append(Turn(**{k: record[k] for k in ("reply", "prompt_tokens", "cached_tokens", "ttft_s", "cattn",
                                                      "external_tokens")}))
    return record


def truncating_chat(llm, conv: Conversation, budget: int) -> list[dict]:
    """``conv``'s turns as a client with a context budget sends them: before each turn, the oldest
    user/assistant pairs after the system prompt are dropped until the prompt fits ``budget`` tokens
    (the last pair is never dropped). One `take_turn_ids` record per turn, with ``dropped_messages``."""
    head, records = (1 if conv.system else 0), []
    for i in range(len(conv.turns), len(conv.user_turns)):
        upcoming, dropped = conv.messages + [{"role": "user", "content": conv.user_turns[i]}], 0
        while prompt_length(llm, upcoming) > budget and len(conv.messages) > head + 2:
            del conv.messages[head:head + 2]
            dropped += 2
            upcoming = conv.messages + [{"role": "user", "content": conv.user_turns[i]}]
        records.append(dict(take_turn_ids(llm, conv), dropped_messages=dropped))
    return records
