"""`ChatSession`: a multi-turn conversation whose history is never recomputed.

A turn works as a chat API server does: it renders the whole conversation with the
tokenizer's chat template, finds the longest common token prefix with the tokens
whose KV the store holds for this session, and prefills only the rest. The stored
KV of that prefix streams into a fresh `PagedCache` layer by layer while the prefill
runs (a `TieredStore` lends its pinned pool pages, no staging copy; the first layers
are copied before the forward, as many as the buffer rule says; what is on disk
only is read one layer at a time behind the prefill, as much of it as the disk
delivers while the rest is prefilled), and each layer's
new KV goes back to the store as soon as the layer wrote it; the reply's KV follows
at the end of the turn. Only new tokens are ever saved, the turn never waits for its
own saves, and the pages are freed. With a device tier (``TieredStore(device=...)``)
the session's first layers stay in device pages between turns instead, as many as the
buffer rule says (and the tier's budget allows): the next turn attends to them in place
and streams only the other layers from DRAM; they are still saved to DRAM, so the tier
is a cache, never the only copy. An edited earlier message, or a tokenization that differs at the seam, costs
the tokens after the first difference, never a wrong answer; a store that cannot
serve (full, corrupt, foreign entry) costs a recompute.

On context overflow, tokens after the first ``keep_first`` (e.g. the system prompt)
are dropped oldest first, a whole number of pages at a time, in the store (metadata
only) before the history is loaded; the kept tokens keep their pre-RoPE KV and are
renumbered from 0, so nothing is recomputed. The session remembers how many rendered
tokens it dropped and drops the same ones from every later rendering.
"""
from __future__ import annotations

import logging
import time
from concurrent.futures import Future

import torch

from cattn.chat.buffer_rule import BufferRule
from cattn.chat.restore import RestorePath
from cattn.chat.turns import FirstTokenTimer, TurnStats, render
from cattn.chat.window_entries import WindowEntries, window_key
from cattn.hf import CACHE_KWARG, PagedCache, PagedLayout, fingerprint
from cattn.store.contract import EntryKey, KVStore, check_store, common_prefix
from cattn.store.device.tier import DeviceTier, Resident
from cattn.store.errors import HistoryLost, StoreFullError
from cattn.store.memory import MemoryStore

DEFAULT_MAX_NEW_TOKENS = 256

log = logging.getLogger(__name__)


class ChatSession(RestorePath):
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
        if store is not None:
            check_store(store, "store")
        self.model, self.tokenizer = model, tokenizer
        self.key = EntryKey(tenant, fingerprint(model), session_id)
        self.store = MemoryStore() if store is None else store
        # A model with sliding layers stores only their window, in an entry of its own (cattn.chat.window_entries).
        self._windows = WindowEntries(self.store, self.key, self.layout) \
            if WindowEntries.applies(self.layout, self.store.device is not None) else None
        self._history: list[int] | None = None      # the stored token ids this turn's history came from
        self.max_context, self.keep_first = max_context, keep_first
        self.messages: list[dict] = [] if system is None else [{"role": "system", "content": system}]
        self.turns: list[TurnStats] = []
        self._dropped = 0            # rendered tokens dropped after keep_first, in every rendering from now on
        self._token_ids: list[int] = []
        self._saved = False
        self._closed = False
        self._saves: list[Future] = []              # the last turn's saves, committing in the background on CUDA
        self._rule = BufferRule(self.layout.num_layers, self._token_nbytes())   # measured by every turn

    @property
    def windows(self) -> WindowEntries | None:
        """The sliding layers' window entries in the store (`cattn.chat.window_entries`), or None: the model
        has no sliding layers, or the store has a device tier (whose resident layers hold every token)."""
        return self._windows

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
        max_new = generate_kwargs.pop("max_new_tokens", None)
        if max_new is None:
            max_new = self.model.generation_config.max_new_tokens or DEFAULT_MAX_NEW_TOKENS
        if isinstance(max_new, bool) or not isinstance(max_new, int) or max_new < 1:
            raise ValueError(f"max_new_tokens must be a positive int, got {max_new!r}")
        start = time.perf_counter()
        streamer = generate_kwargs.pop("streamer", None)
        timer = FirstTokenTimer(start, streamer)
        try:
            return self._send(message, max_new, generate_kwargs, timer)
        except HistoryLost as exc:
            # A history read from disk layer by layer failed its checksum before or during the prefill:
            # the store has dropped it, and the turn is done again without it (no token was produced;
            # a streamer may have had the prompt, and does not get it twice).
            log.warning("session %r: %s; recomputing the turn", self.key.session, exc)
            self._forget()
            return self._send(message, max_new, generate_kwargs, FirstTokenTimer(start, streamer, timer.prompt_passed))

    def _send(self, message, max_new: int, generate_kwargs: dict, timer: FirstTokenTimer) -> str:
        start = timer.start
        self.settle_saves()
        messages = self._next_messages(message)
        rendered = render(self.tokenizer, messages, generation_prompt=True)
        previous = render(self.tokenizer, messages[:-1], generation_prompt=False) if len(messages) > 1 else []
        history = common_prefix(rendered, previous)     # tokens before the new message: the droppable ones
        kf = self.keep_first
        if self._dropped:
            known = (previous if messages[:-1] == self.messages
                     else render(self.tokenizer, self.messages, generation_prompt=False))
            if common_prefix(rendered, known) < kf + self._dropped:
                # Tokens this session dropped were edited: its kept KV no longer follows from the conversation.
                self._forget()
                self._dropped = 0
        prompt = rendered[:kf] + rendered[kf + self._dropped:]
        prompt, cache, reused, dropped = self._restore(prompt, max_new, max(history - self._dropped - kf, 0))

        # The prefill's new KV goes to the store layer by layer, as each layer writes it.
        if cache.stored_layers:
            cache.save_next_step(self.store, self.key, torch.tensor(prompt[reused:], dtype=torch.long), reused)
        ids = torch.tensor([prompt], device=self.model.device)
        try:
            with torch.no_grad():
                out = self.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new,
                                          streamer=timer, **{CACHE_KWARG: cache}, **generate_kwargs)
            reply_ids = getattr(out, "sequences", out)[0, len(prompt):].tolist()
            cached = cache.num_tokens()          # the prompt and all but the last reply token
            # The decode tokens now, in one go; all of the turn's new tokens if the store refused the prefill's.
            first = len(prompt) if cache.step_saved else reused
            if cached > first and cache.stored_layers:
                try:
                    cache.save_tokens(self.store, self.key, torch.tensor((prompt + reply_ids)[first:cached]),
                                      first, first)
                except StoreFullError as exc:
                    log.warning("session %r: the store has no room for the turn's KV (%s)", self.key.session, exc)
            if self._windows is not None and cached:
                self._save_window(cache, (prompt + reply_ids)[:cached])
        finally:
            self._saves = cache.finish()
        self._saved = False
        self._rule.measured(cache.layer_seconds())
        if (device := self.store.device) is not None:
            ids = torch.tensor((prompt + reply_ids)[:cached], dtype=torch.long)
            res = cache.take_resident(ids, self.layout.num_layers)
            device.put(self.key, res, self._resident_share(device, res, len(prompt) - reused))

        reply = self.tokenizer.decode(reply_ids, skip_special_tokens=True)
        self.messages = [*messages, {"role": "assistant", "content": reply}]
        self._token_ids = prompt + reply_ids
        total = time.perf_counter() - start
        self.turns.append(TurnStats(len(prompt), reused, len(prompt) - reused, dropped, len(reply_ids),
                                    cache.held_nbytes(), timer.ttft_s or total, total,
                                    *cache.load_seconds()))
        return reply

    def save(self) -> dict:
        """Make the session reopenable; returns its host-side state (JSON-serialisable) for `open`.
        The KV is in the store already: each turn saves its new tokens as it ends."""
        self.settle_saves()
        self._saved = True
        state = {"session_id": self.key.session, "tenant": self.key.tenant, "model": self.key.model,
                 "messages": [dict(m) for m in self.messages], "dropped_tokens": self._dropped,
                 "keep_first": self.keep_first, "max_context": self.max_context}
        if self._windows is not None and self._windows.only:   # no global entry names the stored tokens
            state["token_ids"] = self._windows.remembered
        return state

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
        cls._resume(session, state)
        return session

    def close(self) -> None:
        """End the session. Its KV is deleted from the store unless `save` was called after the last turn."""
        if not self._closed:
            self.settle_saves()
        if not self._closed and not self._saved:
            self._forget()
        self._closed = True

    def __enter__(self) -> ChatSession:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ---- internals -----------------------------------------------------------------------------
    def _resume(self, state: dict) -> None:
        """Take up `save`'s ``state`` in a new session over the store that holds its KV (`open`)."""
        if self._windows is not None and self._windows.only:
            self._windows.remembered = state.get("token_ids")
        stored = self._stored_history()
        if stored is None:
            why = self.store.dropped_reason(self.key)
            raise LookupError(f"no stored KV for session {self.key.session!r} of tenant {self.key.tenant!r} "
                              "with this model" + ("" if why is None else f": the store dropped it as corrupt "
                                                                          f"({why})"))
        self.messages = [dict(m) for m in state["messages"]]
        self._dropped = int(state["dropped_tokens"])
        self._token_ids = stored.tolist()
        self._saved = True

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

    def _resident_share(self, device: DeviceTier, res: Resident, new_tokens: int) -> int:
        """Layers to keep resident: the buffer rule's ``k`` for a turn of ``new_tokens`` new tokens (from the
        measured copy bandwidth and per-layer compute), within the device tier's budget."""
        k = self._rule.resident_layers(res.num_tokens, res.k[0].device if res.k else self.model.device, new_tokens)
        return device.layers_for(res.layer_nbytes, k)

    def _save_window(self, cache: PagedCache, history: list[int]) -> None:
        """Save the sliding layers' window of ``history`` (what the global entry will hold) under its own
        key, and forget the entry of the history this turn started from."""
        try:
            cache.save_window(self.store, window_key(self.key, history), torch.tensor(history, dtype=torch.long))
        except StoreFullError as exc:
            log.warning("session %r: the store has no room for the sliding layers' KV (%s)", self.key.session, exc)
        if self._history is not None and self._history != history:
            self._windows.delete(self._history)
        if self._windows.only:
            self._windows.remembered = list(history)
        self._history = None

    def _forget(self) -> None:
        """Delete the session's stored KV, its sliding layers' entry included."""
        if self._windows is not None:
            self._windows.forget()
        else:
            self.store.delete(self.key)

    def settle_saves(self) -> None:
        """Wait for the last turn's saves to commit (on CUDA they commit in the background; `send`, `save`
        and `close` wait for them too). A failed save is logged and leaves the store at an older, still
        correct history: a later turn reuses less."""
        saves, self._saves = self._saves, []
        for future in saves:
            if (exc := future.exception()) is not None:
                log.warning("session %r: saving the turn's KV failed (%s)", self.key.session, exc)

