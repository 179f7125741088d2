"""What one chat turn is made of, apart from the store: the conversation rendered as a chat server
renders it (compared with what is stored by `cattn.store.contract.common_prefix`), when the first
reply token came, and `TurnStats`, what `ChatSession.send` reports."""
from __future__ import annotations

import time
from dataclasses import dataclass

from transformers.generation.streamers import BaseStreamer

__all__ = ["TurnStats", "FirstTokenTimer", "render"]


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
        load_hidden_s, load_exposed_s: seconds of the history's layer-wise copy that overlapped the
            prefill's compute, and that the prefill waited for (the copies before the forward included).
    """

    prompt_tokens: int
    reused_tokens: int
    prefilled_tokens: int
    dropped_tokens: int
    generated_tokens: int
    kv_bytes: int
    ttft_s: float
    total_s: float
    load_hidden_s: float = 0.0
    load_exposed_s: float = 0.0


class FirstTokenTimer(BaseStreamer):
    """A ``generate`` streamer that records when the first new token arrives, then hands on to ``inner``;
    with ``prompt_sent`` (a turn done again) ``inner`` already has the prompt and does not get it twice."""

    def __init__(self, start: float, inner: BaseStreamer | None = None, prompt_sent: bool = False):
        self.start, self.inner, self.prompt_sent = start, inner, prompt_sent
        self.ttft_s: float | None = None
        self._puts = 0

    @property
    def prompt_passed(self) -> bool:
        """``inner`` has had the prompt (from this timer or an earlier one)."""
        return self.prompt_sent or self._puts > 0

    def put(self, value):
        self._puts += 1
        if self._puts == 2:   # the first put is the prompt
            self.ttft_s = time.perf_counter() - self.start
        if self.inner is not None and not (self._puts == 1 and self.prompt_sent):
            self.inner.put(value)

    def end(self):
        if self.inner is not None:
            self.inner.end()


def render(tokenizer, messages: list[dict], *, generation_prompt: bool) -> list[int]:
    """Token ids of ``messages`` through the tokenizer's chat template, as a chat server renders them."""
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
    return tokenizer(text, add_special_tokens=False)["input_ids"]
