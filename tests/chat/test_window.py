"""ChatSession of a model with sliding-window layers: the store keeps the global layers' every token and
the sliding layers' window only (`cattn.chat.window_entries`), the pages hold no more, and every reply is what
a session keeping everything would give (and stock's, where stock is the reference)."""
import pytest
import torch

from cattn.hf import PagedCache, PagedLayout, apply_cattn
from cattn.chat.session import ChatSession, common_prefix, render
from cattn.chat.window_entries import SLACK, WindowEntries, window_key
from cattn.store import DiskTier, MemoryStore, TieredStore
from tests.chat.stock import GREEDY, SYSTEM, matches_stock, prompt_ids, reply_ids

WINDOW, PAGE = 6, 4
TEXTS = ["Tell me about the long rivers of the northern plains, please, in some detail.",
         "And which of them floods in the spring, and how often does that happen to the towns?",
         "Which towns were hit hardest the last time, and what did they build afterwards?",
         "Thank you. Summarise all of that in one short sentence for my notes."]
LAYER_TOKEN_BYTES = 2 * 2 * 16 * 4          # (K, V) * KV heads * head_dim * fp32, one layer


@pytest.fixture(params=["gemma2", "gemma3", "mistral"])   # Mistral: every layer slides, no global entry
def windowed(request, tiny_model, byte_tokenizer):
    return apply_cattn(tiny_model(request.param, sliding_window=WINDOW), page_size=PAGE), byte_tokenizer


def window_entry(session, store):
    stored = session.windows.lookup().tolist()
    return stored, store.load(window_key(session.key, stored))


def sliding_layers(model) -> int:
    return sum(w is not None for w in PagedLayout.of(model).sliding_windows)


def test_turns_store_only_the_window_of_sliding_layers_and_equal_stock(windowed):
    model, tok = windowed
    store = MemoryStore()
    session = ChatSession(model, tok, session_id="s", store=store, system=SYSTEM)
    assert session.windows is not None
    stored: list[int] = []
    for n, text in enumerate(TEXTS):
        session.send(text, **GREEDY)
        turn, prompt = session.turns[-1], prompt_ids(session)
        assert matches_stock(model, session)
        assert turn.reused_tokens == min(common_prefix(stored, prompt), len(prompt) - 1) and (n == 0) == (
            turn.reused_tokens == 0)
        stored, tail = window_entry(session, store)
        assert stored == (prompt + reply_ids(session))[:-1]
        # The global layer keeps every token; the sliding ones the window's reach, some slack and a page.
        sliding = sliding_layers(model)
        if sliding < 2:
            assert store.load(session.key).k.shape[:2] == (2 - sliding, len(stored))
        else:
            assert store.lookup(session.key) is None         # no global layer: the window entry is all
        assert tail.k.shape[0] == sliding and min(len(stored), WINDOW - 1) <= tail.num_tokens
        page = PagedLayout.of(model).page_size           # matches_stock patches the model again, with its default
        assert tail.num_tokens <= WINDOW - 1 + SLACK + page - 1
        assert tail.token_ids.tolist() == stored[len(stored) - tail.num_tokens:]
        assert len(store.keys()) == 1 + (sliding < 2)   # the previous turn's window entry is gone
        assert turn.kv_bytes == LAYER_TOKEN_BYTES * ((2 - sliding) * len(stored) + sliding * tail.num_tokens)
    assert len(stored) > 2 * (WINDOW + SLACK)           # long enough that the window entry is a real cut
    session.close()
    assert len(store.keys()) == 0


def test_a_window_entry_that_is_gone_or_of_another_history_costs_a_recompute(windowed):
    model, tok = windowed
    store = MemoryStore()
    session = ChatSession(model, tok, session_id="s", store=store, system=SYSTEM)
    session.send(TEXTS[0], **GREEDY)
    session.send(TEXTS[1], **GREEDY)
    stored, _ = window_entry(session, store)
    store.delete(window_key(session.key, stored))
    session.send(TEXTS[2], **GREEDY)
    assert session.turns[-1].reused_tokens == 0 and matches_stock(model, session)
    session.send(TEXTS[3], **GREEDY)                     # the recomputed turn stored both entries again
    assert session.turns[-1].reused_tokens > 0 and matches_stock(model, session)
    # An edit far before the window: the global entry still serves that prefix, the window cannot.
    edited = [dict(m) for m in session.messages] + [{"role": "user", "content": "Anything else?"}]
    edited[1]["content"] = "Tell me about the short rivers instead."
    session.send(edited, **GREEDY)
    assert session.turns[-1].reused_tokens == 0 and matches_stock(model, session)


def test_overflow_truncation_and_a_restart_from_disk_equal_a_session_keeping_every_token(
        windowed, tmp_path, monkeypatch):
    """The same conversation, past max_context and across a restart, with the sliding layers' window
    only and with every token of every layer: the same replies, the same reuse."""
    model, tok = windowed
    keep = len(render(tok, [{"role": "system", "content": SYSTEM}], generation_prompt=False))

    def converse(folder, keep_windows: bool):
        if not keep_windows:
            monkeypatch.setattr(WindowEntries, "applies", staticmethod(lambda layout, device: False))
        store = TieredStore(1 << 20, DiskTier(folder, 8 << 20))
        session = ChatSession(model, tok, session_id="s", store=store, system=SYSTEM, max_context=220,
                              keep_first=keep)
        for text in TEXTS[:3]:
            session.send(text, **GREEDY)
        state = session.save()
        store.close()
        store = TieredStore(1 << 20, DiskTier(folder, 8 << 20))
        session = ChatSession.open(model, tok, state, store=store)
        assert (session.windows is not None) == keep_windows
        session.send(TEXTS[3], **GREEDY)
        turns = [(t.reused_tokens, t.dropped_tokens) for t in session.turns]
        ids = session.token_ids.tolist()
        store.close(persist=False)
        monkeypatch.undo()
        return turns, ids, state["dropped_tokens"]

    windows = converse(tmp_path / "window", True)
    every = converse(tmp_path / "every", False)
    assert windows == every
    assert windows[2] > 0 and windows[0][0][0] > 0     # it did overflow, and the reopened turn reused


def test_the_pages_of_a_turn_hold_the_window_only(windowed, monkeypatch):
    model, tok = windowed
    session = ChatSession(model, tok, session_id="s", system=SYSTEM)
    held = []
    original = PagedCache.save_window

    def spy(cache, store, key, token_ids):
        held.append((cache.num_tokens(), cache.num_tokens() - cache.first_held()))
        return original(cache, store, key, token_ids)

    monkeypatch.setattr(PagedCache, "save_window", spy)
    for text in TEXTS:
        session.send(text, **GREEDY)
    page = PagedLayout.of(model).page_size
    assert all(h <= WINDOW - 1 + SLACK + page - 1 + 1 for _, h in held) and held[-1][0] > 3 * (WINDOW + SLACK)
    assert torch.equal(session.windows.lookup(), session.token_ids[:-1])
