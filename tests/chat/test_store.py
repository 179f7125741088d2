"""ChatSession over the real hierarchy (TieredStore, DRAM pool over a disk tier): layer-wise loading,
per-layer saving of only the new tokens, and a store that cannot serve costing a recompute, never a crash."""
import logging

from transformers.generation.streamers import BaseStreamer

from cattn.hf import apply_cattn
from cattn.chat.session import ChatSession, common_prefix, render
from cattn.store import DiskTier, StoreFullError, TieredStore
from tests.chat.stock import GREEDY, SYSTEM, first_turn_on_disk, matches_stock, prompt_ids, reply_ids

TOKEN_BYTES = 2 * 2 * 2 * 16 * 4          # layers * (K, V) * KV heads * head_dim * fp32 of the tiny models


class StoredAtFirstToken(BaseStreamer):
    """Records what the store holds for a session when the first reply token arrives."""

    def __init__(self, store, key):
        self.store, self.key, self.puts, self.held = store, key, 0, None

    def put(self, value):
        self.puts += 1
        if self.puts == 2:
            self.held = self.store.lookup(self.key).tolist()

    def end(self):
        pass


def test_turns_stream_history_from_dram_and_save_only_new_tokens(chat_model, tmp_path):
    model, tok = chat_model
    store = TieredStore(1 << 20, DiskTier(tmp_path, 4 << 20))
    session = ChatSession(model, tok, session_id="s", store=store, system=SYSTEM)
    stored: list[int] = []
    for n, text in enumerate(["Hello there", "Tell me more", "And then?"]):
        before = store.stats()
        spy = StoredAtFirstToken(store, session.key)
        session.send(text, streamer=spy, **GREEDY)
        turn, prompt, after = session.turns[-1], prompt_ids(session), store.stats()
        assert matches_stock(model, session)
        assert turn.reused_tokens == min(common_prefix(stored, prompt), len(prompt) - 1)
        assert turn.prefilled_tokens == len(prompt) - turn.reused_tokens and (turn.reused_tokens > 0) == (n > 0)
        assert spy.held == prompt                      # the prefill's KV was saved per layer, before decoding
        stored = store.lookup(session.key).tolist()
        assert stored == (prompt + reply_ids(session))[:-1]
        saved = after["dram"]["bytes_in"] - before["dram"]["bytes_in"]
        assert saved == (len(stored) - turn.reused_tokens) * TOKEN_BYTES       # only the turn's new tokens
        assert after["dram"]["hits"] - before["dram"]["hits"] == (n > 0)
        assert after["transfer"]["loads"] - before["transfer"]["loads"] == (n > 0)
        if n:
            # the buffer rule from measured bandwidth and compute: some layers before the forward, the rest during
            assert turn.load_hidden_s > 0 and turn.load_exposed_s > 0
    store.delete(session.key)
    assert store.stats()["dram"]["used_bytes"] == 0      # no lease is left holding pool space
    store.close(persist=False)


def test_dram_pool_too_small_is_a_miss_not_a_crash(chat_model, caplog):
    model, tok = chat_model
    store = TieredStore(8192, full_timeout_s=0.01)       # about 16 tokens: no turn fits
    session = ChatSession(model, tok, session_id="s", store=store, system=SYSTEM)
    with caplog.at_level(logging.WARNING):
        for text in ["Hello there", "Tell me more"]:
            session.send(text, **GREEDY)
            assert session.turns[-1].reused_tokens == 0 and matches_stock(model, session)
    assert "no room" in caplog.text and store.lookup(session.key) is None


def test_a_store_that_cannot_lend_is_a_miss(chat_model, monkeypatch):
    model, tok = chat_model
    store = TieredStore(1 << 20)
    session = ChatSession(model, tok, session_id="s", store=store, system=SYSTEM)
    session.send("Hello there", **GREEDY)

    def full(key, num_tokens=None, **kwargs):
        raise StoreFullError("every session is leased")
    monkeypatch.setattr(store, "acquire", full)
    session.send("Tell me more", **GREEDY)
    assert session.turns[-1].reused_tokens == 0 and matches_stock(model, session)
    monkeypatch.undo()
    session.send("And then?", **GREEDY)                  # the recomputed turn was saved: reused again
    assert session.turns[-1].reused_tokens > 0 and matches_stock(model, session)


def test_corrupt_chunk_on_disk_is_a_miss_after_a_restart(chat_model, tmp_path):
    model, tok = chat_model
    state = first_turn_on_disk(chat_model, tmp_path)
    chunk = next(tmp_path.rglob("*.kv"))
    data = bytearray(chunk.read_bytes())
    data[-3] ^= 0x5A                                     # a flipped byte in the payload
    chunk.write_bytes(bytes(data))
    again_store = TieredStore(1 << 20, DiskTier(tmp_path, 4 << 20))
    again = ChatSession.open(model, tok, state, store=again_store)
    again.send("Which number?", **GREEDY)
    assert again.turns[-1].reused_tokens == 0 and matches_stock(model, again)
    assert again_store.stats()["disk"]["corrupt"] == 1
    again_store.close(persist=False)


def test_other_tenant_and_truncation_over_the_tiered_store(tiny_model, byte_tokenizer):
    model = apply_cattn(tiny_model("llama", num_hidden_layers=1), page_size=4)
    store = TieredStore(1 << 20)
    keep = len(render(byte_tokenizer, [{"role": "system", "content": SYSTEM}], generation_prompt=False))
    session = ChatSession(model, byte_tokenizer, session_id="s", tenant="acme", store=store, system=SYSTEM,
                          max_context=112, keep_first=keep)
    drops = 0
    for text in ["First question", "Second one", "Third here", "Fourth now"]:
        session.send(text, **GREEDY)
        turn = session.turns[-1]
        assert matches_stock(model, session)
        if turn.dropped_tokens:
            drops += 1
            assert turn.reused_tokens > keep
            assert store.lookup(session.key).tolist() == session.token_ids.tolist()[:-1]
    assert drops >= 1
    intruder = ChatSession(model, byte_tokenizer, session_id="s", tenant="intruder", store=store, system=SYSTEM)
    intruder.send("First question", **GREEDY)
    assert intruder.turns[-1].reused_tokens == 0
