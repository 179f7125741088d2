"""`ChatSession`: a multi-turn conversation whose history is never recomputed.

A turn works as a chat API server does: it renders the whole conversation with the
tokenizer's chat template, finds the longest common token prefix with the tokens
whose KV the store holds for this session, loads that KV into a fresh `PagedCache`,
prefills only the rest and generates. The turn's new KV (prompt tail and reply) then
goes to the store, only those tokens, and the pages are freed: between turns a
session holds no accelerator memory. An edited earlier message, or a tokenization
that differs at the seam, costs the tokens after the first difference, never a
wrong answer.

On context overflow, tokens after the first ``keep_first`` (e.g. the system prompt)
are dropped oldest first, a whole number of pages at a time, in the pages and in
the store alike; the kept tokens keep their pre-RoPE KV and are renumbered from 0,
so nothing is recomputed. The session remembers how many rendered tokens it dropped
and drops the same ones from every later rendering.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from transformers.generation.streamers import BaseStreamer

from cattn.hf import CACHE_KWARG, PagedCache, PagedLayout, fingerprint
from cattn.store.base import EntryKey, KVEntry, KVStore
from cattn.store.memory import MemoryStore

DEFAULT_MAX_NEW_TOKENS = 256


@dataclass(frozen=True)
class TurnStats:
    """What one `ChatSession.send` did.

    Attributes:
        prompt_tokens: tokens the model attended to before replying (after any truncation).
        reused_tokens: prompt tokens whose KV came from the store.
        prefilled_tokens: prompt tokens computed this turn (``prompt_tokens - reused_tokens``).
        dropped_tokens: tokens dropped from the context this turn to fit ``max_context``.
        generated_tokens: tokens of the reply.
        kv_bytes: bytes of K and V the store keeps for the session after the turn.
        ttft_s: seconds from the call to the first reply token.
        total_s: seconds of the whole call.
    """

    prompt_tokens: int
    reused_tokens: int
    prefilled_tokens: int
    dropped_tokens: int
    generated_tokens: int
    kv_bytes: int
    ttft_s: float
    total_s: float


class FirstTokenTimer(BaseStreamer):
    """A ``generate`` streamer that records when the first new token arrives, then hands on to ``inner``."""

    def __init__(self, start: float, inner: BaseStreamer | None = None):
        self.start, self.inner = start, inner
        self.ttft_s: float | None = None
        self._puts = 0

    def put(self, value):
        self._puts += 1
        if self._puts == 2:   # the first put is the prompt
            self.ttft_s = time.perf_counter() - self.start
        if self.inner is not None:
            self.inner.put(value)

    def end(self):
        if self.inner is not None:
            self.inner.end()


def render(tokenizer, messages: list[dict], *, generation_prompt: bool) -> list[int]:
    """Token ids of ``messages`` through the tokenizer's chat template, as a chat server renders them."""
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def common_prefix(a: list[int], b: list[int]) -> int:
    """Length of the longest common prefix of two token lists."""
    n = min(len(a), len(b))
    return next((i for i in range(n) if a[i] != b[i]), n)


class ChatSession:
    """A conversation with a cattn-patched model whose KV waits in a `KVStore` between turns.

    Args:
        model: a causal LM patched by `cattn.hf.apply_cattn`.
        tokenizer: its tokenizer, with a chat template.
        session_id: name of the session in the store (letters, digits, ``._-``).
        tenant: owner of the session; a tenant never reads another's KV.
        store: where the KV waits between turns; default a private `MemoryStore`.
        max_context: most tokens the model attends to, reply included; default the model's
            ``max_position_embeddings``.
        keep_first: tokens never dropped on overflow (e.g. the rendered system prompt).
        system: optional system prompt, the first message of the conversation.
    """

    def __init__(self, model, tokenizer, *, session_id: str, tenant: str = "default", store: KVStore | None = None,
                 max_context: int | None = None, keep_first: int = 0, system: str | None = None):
        self.layout = PagedLayout.of(model)
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError("tokenizer has no chat template")
        max_context = model.config.get_text_config().max_position_embeddings if max_context is None else max_context
        if not isinstance(max_context, int) or max_context < 2:
            raise ValueError(f"max_context must be an int >= 2, got {max_context!r}")
        if not isinstance(keep_first, int) or not 0 <= keep_first < max_context:
            raise ValueError(f"keep_first must be an int in [0, max_context={max_context}), got {keep_first!r}")
        if store is not None and not isinstance(store, KVStore):
            raise TypeError(f"store must be a cattn KVStore, got {type(store).__name__}")
        self.model, self.tokenizer = model, tokenizer
        self.key = EntryKey(tenant, fingerprint(model), session_id)
        self.store = MemoryStore() if store is None else store
        self.max_context, self.keep_first = max_context, keep_first
        self.messages: list[dict] = [] if system is None else [{"role": "system", "content": system}]
        self.turns: list[TurnStats] = []
        self._dropped = 0            # rendered tokens dropped after keep_first, in every rendering from now on
        self._token_ids: list[int] = []
        self._saved = False
        self._closed = False

    @property
    def token_ids(self) -> torch.Tensor:
        """``[n] int64``: the last turn's prompt as the model saw it (after truncation) and its reply."""
        return torch.tensor(self._token_ids, dtype=torch.long)

    def send(self, message: str | list[dict], **generate_kwargs) -> str:
        """One turn: returns the reply and appends it to `messages`; `turns` gets its `TurnStats`.

        Args:
            message: the user's new message, or the whole conversation as ``[{"role", "content"}, ...]``
                (a client that edited an earlier message pays only for the tokens after the edit).
            generate_kwargs: passed to ``model.generate`` (``max_new_tokens`` default: the model's
                generation config, else 256).
        """
        if self._closed:
            raise RuntimeError(f"session {self.key.session!r} is closed")
        start = time.perf_counter()
        messages = self._next_messages(message)
        max_new = (generate_kwargs.pop("max_new_tokens", None) or self.model.generation_config.max_new_tokens
                   or DEFAULT_MAX_NEW_TOKENS)
        rendered = render(self.tokenizer, messages, generation_prompt=True)
        previous = render(self.tokenizer, messages[:-1], generation_prompt=False) if len(messages) > 1 else []
        history = common_prefix(rendered, previous)     # tokens before the new message: the droppable ones
        kf = self.keep_first
        if self._dropped:
            known = (previous if messages[:-1] == self.messages
                     else render(self.tokenizer, self.messages, generation_prompt=False))
            if common_prefix(rendered, known) < kf + self._dropped:
                # Tokens this session dropped were edited: its kept KV no longer follows from the conversation.
                self.store.delete(self.key)
                self._dropped = 0
        prompt = rendered[:kf] + rendered[kf + self._dropped:]
        prompt, cache, reused, dropped = self._restore(prompt, max_new, max(history - self._dropped - kf, 0))

        ids = torch.tensor([prompt], device=self.model.device)
        timer = FirstTokenTimer(start, generate_kwargs.pop("streamer", None))
        with torch.no_grad():
            out = self.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new,
                                      streamer=timer, **{CACHE_KWARG: cache}, **generate_kwargs)
        reply_ids = getattr(out, "sequences", out)[0, len(prompt):].tolist()

        cached = cache.num_tokens()              # the prompt and all but the last reply token
        new_ids = (prompt + reply_ids)[reused:cached]
        k, v = cache.read(reused, cached)
        self.store.save(self.key, KVEntry(torch.tensor(new_ids, dtype=torch.long), k, v), start=reused)
        self._saved = False

        reply = self.tokenizer.decode(reply_ids, skip_special_tokens=True)
        self.messages = [*messages, {"role": "assistant", "content": reply}]
        self._token_ids = prompt + reply_ids
        total = time.perf_counter() - start
        self.turns.append(TurnStats(len(prompt), reused, len(prompt) - reused, dropped, len(reply_ids),
                                    cached * cache.nbytes_per_token, timer.ttft_s or total, total))
        return reply

    def save(self) -> dict:
        """Make the session reopenable; returns its host-side state (JSON-serialisable) for `open`.
        The KV is in the store already: each turn saves its new tokens as it ends."""
        self._saved = True
        return {"session_id": self.key.session, "tenant": self.key.tenant, "model": self.key.model,
                "messages": [dict(m) for m in self.messages], "dropped_tokens": self._dropped,
                "keep_first": self.keep_first, "max_context": self.max_context}

    @classmethod
    def open(cls, model, tokenizer, state: dict, *, store: KVStore, tenant: str | None = None) -> ChatSession:
        """Reopen a session from `save`'s ``state`` and the store that holds its KV.

        ``tenant`` is the caller's tenant (default: the one in ``state``); the KV is looked up
        under it and under ``model``'s own fingerprint, so another tenant's session or one saved
        by a different model is never served.

        Raises:
            ValueError: ``state`` was saved by a model with another fingerprint.
            LookupError: the store holds no KV for this tenant, model and session.
        """
        tenant = state["tenant"] if tenant is None else tenant
        session = cls(model, tokenizer, session_id=state["session_id"], tenant=tenant, store=store,
                      max_context=state["max_context"], keep_first=state["keep_first"])
        if state["model"] != session.key.model:
            raise ValueError(f"session {state['session_id']!r} was saved by a different model (fingerprint "
                             f"{state['model']}, this model's is {session.key.model}): its KV cannot be reused")
        stored = store.lookup(session.key)
        if stored is None:
            raise LookupError(f"no stored KV for session {session.key.session!r} of tenant {session.key.tenant!r} "
                              "with this model")
        session.messages = [dict(m) for m in state["messages"]]
        session._dropped = int(state["dropped_tokens"])
        session._token_ids = stored.tolist()
        session._saved = True
        return session

    def close(self) -> None:
        """End the session. Its KV is deleted from the store unless `save` was called after the last turn."""
        if not self._closed and not self._saved:
            self.store.delete(self.key)
        self._closed = True

    def __enter__(self) -> ChatSession:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ---- internals -----------------------------------------------------------------------------
    def _next_messages(self, message) -> list[dict]:
        if isinstance(message, str):
            if not message.strip():
                raise ValueError("message must be a non-empty string")
            return [*self.messages, {"role": "user", "content": message}]
        if (isinstance(message, list) and message and all(
                isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                for m in message)):
            if not message[-1]["content"].strip():
                raise ValueError("message: the last message of the conversation is empty")
            return [dict(m) for m in message]
        raise TypeError("message must be a non-empty str or a non-empty list of {'role': str, 'content': str} dicts")

    def _restore(self, prompt: list[int], max_new: int, droppable: int) -> tuple[list[int], PagedCache, int, int]:
        """Load the stored KV of the prompt's longest cached prefix into a fresh cache and drop up to
        ``droppable`` tokens after ``keep_first`` if the turn would overflow ``max_context``. Returns
        the prompt after dropping, the cache, the prompt tokens it holds, and the tokens dropped."""
        stored = self.store.lookup(self.key)
        reused = 0 if stored is None else min(common_prefix(stored.tolist(), prompt), len(prompt) - 1)
        cache = PagedCache(self.model, max_tokens=len(prompt) + max_new)
        if reused:
            entry = self.store.load(self.key, reused)
            expect = (self.layout.num_layers, reused, self.layout.num_kv_heads, self.layout.head_dim)
            if entry is None or tuple(entry.k.shape) != expect or entry.token_ids.tolist() != prompt[:reused]:
                self.store.delete(self.key)  # changed or corrupt since the lookup: a miss, never wrong KV
                reused = 0
            else:
                cache.load(entry.k, entry.v)
        drop = self._overflow(len(prompt), max_new, droppable)
        if not drop:
            return prompt, cache, reused, 0
        kf = self.keep_first
        in_cache = cache.truncate(min(drop, reused - kf), kf) if reused > kf else 0
        if in_cache:
            self.store.truncate(self.key, in_cache, kf)
        # The cache dropped [kf, kf + in_cache) of the prompt; in_cache < drop only if nothing cached after kf remains.
        drop = max(drop, in_cache)
        self._dropped += drop
        return prompt[:kf] + prompt[kf + drop:], cache, reused - in_cache, drop

    def _overflow(self, prompt_len: int, max_new: int, droppable: int) -> int:
        """Tokens to drop after ``keep_first`` so the turn fits ``max_context``: whole pages, unless the
        history holds fewer. Raises ValueError if dropping all ``droppable`` history is not enough."""
        need = prompt_len + max_new - self.max_context
        if need <= 0:
            return 0
        if need > droppable:
            raise ValueError(f"the prompt ({prompt_len} tokens) and max_new_tokens ({max_new}) exceed max_context "
                             f"({self.max_context}) even without the {droppable} tokens of history after the first "
                             f"{self.keep_first}")
        return min(-(-need // self.layout.page_size) * self.layout.page_size, droppable)
